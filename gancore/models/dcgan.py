"""DCGAN generator and discriminator (Radford et al., 2016)."""

import math

import torch
from torch import nn

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 128


def _num_blocks(image_size: int) -> int:
    """Number of 2x resampling steps between 4x4 and `image_size`."""
    valid = [2**k for k in range(int(math.log2(MIN_IMAGE_SIZE)), int(math.log2(MAX_IMAGE_SIZE)) + 1)]
    if image_size not in valid:
        raise ValueError(f"DCGAN image_size must be one of {valid}, got {image_size}")
    return int(math.log2(image_size)) - 2


def _widths(num_blocks: int, base_channels: int) -> list[int]:
    """Feature widths from the 4x4 end to the full-resolution end, capped at base_channels * 8."""
    return [base_channels * min(2 ** (num_blocks - 1 - i), 8) for i in range(num_blocks)]


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), zero biases."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Maps z of shape (N, latent_dim) to images (N, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, base_channels: int) -> None:
        super().__init__()
        num_blocks = _num_blocks(image_size)
        widths = _widths(num_blocks, base_channels)
        self.latent_dim = latent_dim
        self.channels = channels
        self.image_size = image_size

        # Biases are dropped before BatchNorm, which cancels them.
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for in_width, out_width in zip(widths[:-1], widths[1:]):
            layers += [
                nn.ConvTranspose2d(in_width, out_width, 4, 2, 1, bias=False),
                nn.BatchNorm2d(out_width),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class Discriminator(nn.Module):
    """Maps images (N, channels, image_size, image_size) to raw logits (N,)."""

    def __init__(self, channels: int, image_size: int, base_channels: int) -> None:
        super().__init__()
        num_blocks = _num_blocks(image_size)
        widths = _widths(num_blocks, base_channels)[::-1]
        self.channels = channels
        self.image_size = image_size

        # No BatchNorm on the first layer (Radford et al.): it destabilises training on raw pixels.
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        for in_width, out_width in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Conv2d(in_width, out_width, 4, 2, 1, bias=False),
                nn.BatchNorm2d(out_width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def build(latent_dim: int, channels: int, image_size: int, base_channels: int) -> tuple[Generator, Discriminator]:
    """Generator and discriminator for one image shape."""
    generator = Generator(latent_dim, channels, image_size, base_channels)
    discriminator = Discriminator(channels, image_size, base_channels)
    return generator, discriminator
