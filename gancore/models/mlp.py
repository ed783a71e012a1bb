"""Fully connected GAN (Goodfellow et al., 2014).

The paper's discriminator used maxout units with dropout; LeakyReLU(0.2) with dropout is the modern stand-in
used here. The generator ends in tanh (the paper used a sigmoid) so images are in [-1, 1] like every family.
"""

import torch
from torch import nn

from gancore.models.layers import Discriminator, check_labels, resolution_steps
from gancore.models.spec import ModelSpec

# Weights budget of the layer touching the pixels: hidden widths shrink for large images so that a
# 128x128x3 model stays at a few million parameters.
PIXEL_LAYER_BUDGET = 2**22
MIN_HIDDEN_WIDTH = 64
DROPOUT = 0.5


def hidden_widths(channels: int, image_size: int, base_channels: int) -> list[int]:
    """Generator hidden widths (8x, 16x base_channels), capped by the pixel-layer budget; D uses them reversed."""
    resolution_steps(image_size)  # same image sizes as the conv families
    cap = max(MIN_HIDDEN_WIDTH, PIXEL_LAYER_BUDGET // (channels * image_size * image_size))
    return [min(8 * base_channels, cap), min(16 * base_channels, cap)]


class Generator(nn.Module):
    """z (N, latent_dim) [with a learned label embedding concatenated] -> ReLU MLP -> tanh images."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, base_channels: int,
                 num_classes: int = 0) -> None:
        super().__init__()
        widths = hidden_widths(channels, image_size, base_channels)
        self.latent_dim = latent_dim
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_features = 2 * latent_dim if num_classes else latent_dim
        self.net = nn.Sequential(
            nn.Linear(in_features, widths[0]),
            nn.ReLU(inplace=True),
            nn.Linear(widths[0], widths[1]),
            nn.ReLU(inplace=True),
            nn.Linear(widths[1], channels * image_size * image_size),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = check_labels(labels, self.num_classes, z.shape[0])
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(z).view(z.shape[0], self.channels, self.image_size, self.image_size)


def discriminator_trunk(channels: int, image_size: int, base_channels: int) -> tuple[nn.Sequential, int]:
    """Flatten -> two LeakyReLU(0.2) hidden layers with dropout between them; returns trunk and feature size."""
    widths = hidden_widths(channels, image_size, base_channels)[::-1]
    trunk = nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * image_size * image_size, widths[0]),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Dropout(DROPOUT),
        nn.Linear(widths[0], widths[1]),
        nn.LeakyReLU(0.2, inplace=True),
    )
    return trunk, widths[1]


def build(spec: ModelSpec) -> tuple[Generator, Discriminator]:
    """MLP pair with PyTorch's default (Kaiming-uniform) initialisation."""
    generator = Generator(spec.latent_dim, spec.channels, spec.image_size, spec.base_channels, spec.num_classes)
    trunk, feature_dim = discriminator_trunk(spec.channels, spec.image_size, spec.base_channels)
    return generator, Discriminator(trunk, feature_dim, spec.num_classes, spec.minibatch_discrimination)
