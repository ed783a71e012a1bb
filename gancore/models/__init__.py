"""GAN model families, built from a ModelSpec.

Every generator maps (z (N, latent_dim), labels (N,) | None) to images (N, C, S, S) in [-1, 1]; every
discriminator maps (images, labels | None) to logits (N,) and has `features(images)` -> (N, feature_dim).
Labels are required when num_classes > 0 and ignored when it is 0.
"""

from collections.abc import Callable

from torch import nn

from gancore.models import dcgan, mlp, sngan, wgan_gp
from gancore.models.layers import apply_spectral_norm
from gancore.models.spec import ModelSpec

_BUILDERS: dict[str, Callable[[ModelSpec], tuple[nn.Module, nn.Module]]] = {
    "mlp": mlp.build,
    "dcgan": dcgan.build,
    "wgan_gp": wgan_gp.build,
    "sngan": sngan.build,
}
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def build_gan(spec: ModelSpec) -> tuple[nn.Module, nn.Module]:
    """Return (generator, discriminator) of spec.family; spectral norm on D when asked (sngan always has it)."""
    if spec.family not in _BUILDERS:
        raise ValueError(f"unknown GAN family {spec.family!r}; valid families: {', '.join(FAMILIES)}")
    generator, discriminator = _BUILDERS[spec.family](spec)
    if spec.spectral_norm:
        apply_spectral_norm(discriminator)
    return generator, discriminator


__all__ = ["FAMILIES", "ModelSpec", "build_gan"]
