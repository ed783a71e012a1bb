"""Model families, built by name."""

from typing import Callable

from torch import nn

from gancore.models import dcgan

_BUILDERS: dict[str, Callable[[int, int, int, int], tuple[nn.Module, nn.Module]]] = {
    "dcgan": dcgan.build,
}
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def build_gan(
    family: str, latent_dim: int, channels: int, image_size: int, base_channels: int
) -> tuple[nn.Module, nn.Module]:
    """Return (generator, discriminator) of the named family."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown GAN family {family!r}; valid families: {', '.join(FAMILIES)}")
    return _BUILDERS[family](latent_dim, channels, image_size, base_channels)


__all__ = ["FAMILIES", "build_gan"]
