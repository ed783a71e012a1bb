"""Discriminator regularisers: WGAN-GP gradient penalty and R1.

Both differentiate D's output with respect to its input (create_graph=True, so the
penalty itself is trained). Call them on the plain module, not a DDP wrapper: DDP's
reducer does not support double backward, while the parameter gradients the penalty
produces are still all-reduced by the wrapper's hooks in the loss's backward pass.
"""

import torch
from torch import nn


def _input_gradient(discriminator: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    images = images.detach().requires_grad_(True)
    logits = discriminator(images, labels)
    (gradient,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return gradient.flatten(1)


def gradient_penalty(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None,
    mix: torch.Tensor,
) -> torch.Tensor:
    """Gulrajani et al. 2017: mean of (||grad D(x_hat)|| - 1)^2 on x_hat = mix * real + (1 - mix) * fake.

    `mix` holds one U(0, 1) draw per sample, shape (N,); the caller draws it so runs are reproducible.
    """
    mix = mix.to(real.device, real.dtype).view(-1, *([1] * (real.dim() - 1)))
    interpolated = mix * real.detach() + (1.0 - mix) * fake.detach()
    return (_input_gradient(discriminator, interpolated, labels).norm(dim=1) - 1.0).square().mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Mescheder et al. 2018: mean squared norm of grad D(real); the caller scales it by gamma / 2."""
    return _input_gradient(discriminator, real, labels).square().sum(dim=1).mean()


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    """Salimans et al. 2016: squared distance between mean D features of a real and a fake batch."""
    return (real_features.detach().mean(dim=0) - fake_features.mean(dim=0)).square().sum()
