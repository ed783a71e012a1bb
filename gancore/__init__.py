"""gancore: GAN models, losses, training step and metrics in plain PyTorch, numpy and scipy."""
