"""WGAN-GP (Gulrajani et al., 2017): the DCGAN generator and a DCGAN critic without batch norm.

The gradient penalty is per sample, which batch norm breaks, so the critic uses layer normalisation
(GroupNorm with one group) as the paper recommends. The penalty and n_critic live in the training step.
"""

from torch import nn

from gancore.models import dcgan
from gancore.models.layers import Discriminator
from gancore.models.spec import ModelSpec


def layer_norm(width: int) -> nn.GroupNorm:
    """Layer normalisation over (C, H, W) of each sample, with per-channel gain and bias."""
    return nn.GroupNorm(1, width)


def build(spec: ModelSpec) -> tuple[dcgan.Generator, Discriminator]:
    """DCGAN generator and layer-normalised DCGAN critic, both with DCGAN initialisation."""
    generator = dcgan.Generator(spec.latent_dim, spec.channels, spec.image_size, spec.base_channels, spec.num_classes,
                                spec.upsample)
    trunk, feature_dim = dcgan.discriminator_trunk(spec.channels, spec.image_size, spec.base_channels, layer_norm)
    critic = Discriminator(trunk, feature_dim, spec.num_classes, spec.minibatch_discrimination)
    critic.apply(dcgan.init_weights)
    return generator, critic
