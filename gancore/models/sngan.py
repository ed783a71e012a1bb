"""SNGAN ResNet generator and discriminator (Miyato et al., 2018); with num_classes > 0 this is the cGAN with a
projection discriminator (Miyato & Koyama, 2018): per-class BatchNorm in G, projection in D.

Sizes follow the paper's ImageNet layout for every image size: G doubles from 4x4 with one residual block per
step; D halves down to 4x4 (its first block the paper's "optimized" block), adds one block at 4x4, then
ReLU and global sum pooling. Initialisation is Glorot-uniform as in the authors' code: gain sqrt(2) on the
residual 3x3 convs, 1 on shortcuts, linear layers, embeddings and the output conv.
"""

import math
from itertools import pairwise
from typing import TypeVar

import torch
from torch import nn

from gancore.models.layers import (
    ConditionalSequential,
    Discriminator,
    apply_spectral_norm,
    batch_norm,
    channel_widths,
    check_labels,
    resolution_steps,
    upsampling_conv,
)
from gancore.models.spec import ModelSpec

RESIDUAL_GAIN = math.sqrt(2)


Layer = TypeVar("Layer", nn.Conv2d, nn.Linear)


def _glorot(layer: Layer, gain: float = 1.0) -> Layer:
    nn.init.xavier_uniform_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return _glorot(nn.Conv2d(in_channels, out_channels, 3, 1, 1), RESIDUAL_GAIN)


def _upsampling_conv(in_channels: int, out_channels: int, upsample: str) -> nn.Module:
    """The paper's nearest-upsample + 3x3 conv (`resize`), or a 4x4 stride-2 transposed conv in its place."""
    layer = upsampling_conv(in_channels, out_channels, upsample)
    _glorot(layer if upsample == "transposed" else layer[1], RESIDUAL_GAIN)
    return layer


class UpBlock(nn.Module):
    """BN-ReLU-upsample+conv-BN-ReLU-conv3x3, plus an upsampled 1x1-conv shortcut; doubles the resolution.
    `upsample`: `resize` (the paper's nearest 2x + 3x3 conv) or `transposed` (a 4x4 stride-2 transposed conv)."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int, upsample: str = "resize") -> None:
        super().__init__()
        self.residual = ConditionalSequential(
            batch_norm(in_channels, num_classes),
            nn.ReLU(),
            _upsampling_conv(in_channels, out_channels, upsample),
            batch_norm(out_channels, num_classes),
            nn.ReLU(),
            _conv3x3(out_channels, out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), _glorot(nn.Conv2d(in_channels, out_channels, 1))
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.residual(x, labels) + self.shortcut(x)


class DownBlock(nn.Module):
    """[ReLU]-conv3x3-ReLU-conv3x3-[avgpool], plus a [pooled] 1x1-conv shortcut where the shape changes.

    The first block of D (`preactivate=False`) skips the leading ReLU: its input is the image itself.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, preactivate: bool) -> None:
        super().__init__()
        # Not in place: the shortcut still needs x.
        layers: list[nn.Module] = [nn.ReLU()] if preactivate else []
        layers += [_conv3x3(in_channels, out_channels), nn.ReLU(), _conv3x3(out_channels, out_channels)]
        shortcut: list[nn.Module] = []
        if downsample:
            layers.append(nn.AvgPool2d(2))
            shortcut.append(nn.AvgPool2d(2))  # pooling commutes with a 1x1 conv; pooling first is cheaper
        if downsample or in_channels != out_channels:
            shortcut.append(_glorot(nn.Conv2d(in_channels, out_channels, 1)))
        self.residual = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class GlobalSumPool(nn.Module):
    """(N, C, H, W) -> (N, C): sum, not mean, over positions, as in SNGAN's discriminator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(2, 3))


class Generator(nn.Module):
    """Maps z (N, latent_dim) [and labels (N,)] to images (N, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, base_channels: int,
                 num_classes: int = 0, upsample: str = "resize") -> None:
        super().__init__()
        widths = channel_widths(resolution_steps(image_size) + 1, base_channels)  # at 4x4, 8x8, ..., image_size
        self.latent_dim = latent_dim
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.linear = _glorot(nn.Linear(latent_dim, widths[0] * 4 * 4))
        self.blocks = nn.ModuleList(
            UpBlock(in_width, out_width, num_classes, upsample) for in_width, out_width in pairwise(widths)
        )
        self.to_image = ConditionalSequential(
            batch_norm(widths[-1], num_classes),
            nn.ReLU(),
            _glorot(nn.Conv2d(widths[-1], channels, 3, 1, 1)),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = check_labels(labels, self.num_classes, z.shape[0])
        h = self.linear(z).view(z.shape[0], -1, 4, 4)
        for block in self.blocks:
            h = block(h, labels)
        return self.to_image(h, labels)


def discriminator_trunk(channels: int, image_size: int, base_channels: int) -> tuple[nn.Sequential, int]:
    """Residual down-blocks mirroring the generator's widths, a block at 4x4, ReLU, global sum pooling;
    returns the trunk and its feature size."""
    widths = channel_widths(resolution_steps(image_size) + 1, base_channels)[:-1][::-1]  # at image_size/2, ..., 4x4
    blocks = [DownBlock(channels, widths[0], downsample=True, preactivate=False)]
    blocks += [DownBlock(i, o, downsample=True, preactivate=True) for i, o in pairwise(widths)]
    blocks.append(DownBlock(widths[-1], widths[-1], downsample=False, preactivate=True))
    return nn.Sequential(*blocks, nn.ReLU(), GlobalSumPool()), widths[-1]


def build(spec: ModelSpec) -> tuple[Generator, Discriminator]:
    """SNGAN pair; D always carries spectral norm on every conv, linear and embedding."""
    generator = Generator(spec.latent_dim, spec.channels, spec.image_size, spec.base_channels, spec.num_classes,
                          spec.upsample)
    trunk, feature_dim = discriminator_trunk(spec.channels, spec.image_size, spec.base_channels)
    discriminator = Discriminator(trunk, feature_dim, spec.num_classes, spec.minibatch_discrimination)
    # The trunk is all convs, initialised as built; the head's linear layers and embedding get Glorot here.
    for module in discriminator.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.xavier_uniform_(module.weight)
    return generator, apply_spectral_norm(discriminator)
