"""DCGAN generator and discriminator trunk (Radford et al., 2016)."""

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from gancore.models.layers import (
    ConditionalBatchNorm2d,
    ConditionalSequential,
    Discriminator,
    batch_norm,
    channel_widths,
    check_labels,
    resolution_steps,
    upsampling_conv,
)
from gancore.models.spec import ModelSpec


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv/linear/embedding weights N(0, 0.02), BatchNorm gains N(1, 0.02), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, ConditionalBatchNorm2d):  # after its embeddings: apply() visits children first
        nn.init.normal_(module.gain.weight, 1.0, 0.02)
        nn.init.zeros_(module.shift.weight)


class Generator(nn.Module):
    """Maps z (N, latent_dim) [and labels (N,)] to images (N, channels, image_size, image_size) in [-1, 1].
    Class-conditional through per-class BatchNorm gains and biases when num_classes > 0; every 2x step
    upsamples by `upsample` (layers.upsampling_conv: transposed or resize)."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, base_channels: int,
                 num_classes: int = 0, upsample: str = "transposed") -> None:
        super().__init__()
        widths = channel_widths(resolution_steps(image_size), base_channels)
        self.latent_dim = latent_dim
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes

        # Biases are dropped before BatchNorm, which cancels them.
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
            batch_norm(widths[0], num_classes),
            nn.ReLU(inplace=True),
        ]
        for in_width, out_width in pairwise(widths):
            layers += [
                upsampling_conv(in_width, out_width, upsample, bias=False),
                batch_norm(out_width, num_classes),
                nn.ReLU(inplace=True),
            ]
        layers += [upsampling_conv(widths[-1], channels, upsample), nn.Tanh()]
        self.net = ConditionalSequential(*layers)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = check_labels(labels, self.num_classes, z.shape[0])
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1), labels)


def discriminator_trunk(channels: int, image_size: int, base_channels: int,
                        norm: Callable[[int], nn.Module]) -> tuple[nn.Sequential, int]:
    """Strided 4x4 convs with LeakyReLU(0.2) down to 4x4, `norm(width)` after every conv but the first;
    returns the trunk and its flattened feature size."""
    widths = channel_widths(resolution_steps(image_size), base_channels)[::-1]
    # No normalisation on the first layer (Radford et al.): it destabilises training on raw pixels.
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    for in_width, out_width in pairwise(widths):
        layers += [
            nn.Conv2d(in_width, out_width, 4, 2, 1, bias=False),
            norm(out_width),
            nn.LeakyReLU(0.2, inplace=True),
        ]
    return nn.Sequential(*layers), widths[-1] * 4 * 4


def build(spec: ModelSpec) -> tuple[Generator, Discriminator]:
    """DCGAN pair; D's linear head on the flattened 4x4 features is the paper's final 4x4 conv."""
    generator = Generator(spec.latent_dim, spec.channels, spec.image_size, spec.base_channels, spec.num_classes,
                          spec.upsample)
    trunk, feature_dim = discriminator_trunk(spec.channels, spec.image_size, spec.base_channels, nn.BatchNorm2d)
    discriminator = Discriminator(trunk, feature_dim, spec.num_classes, spec.minibatch_discrimination)
    discriminator.apply(init_weights)
    return generator, discriminator
