"""The architecture of one GAN, as build_gan takes it."""

from dataclasses import dataclass

from gancore.models.layers import UPSAMPLING, resolution_steps


@dataclass(frozen=True)
class ModelSpec:
    """Which family, for which image shape, at which width; optional class conditioning and D regularisers."""

    family: str
    latent_dim: int
    channels: int
    image_size: int
    base_channels: int
    num_classes: int = 0  # 0: unconditional; > 0: class-conditional G and projection D
    spectral_norm: bool = False  # spectral norm on every conv/linear/embedding of D (sngan always has it)
    minibatch_discrimination: bool = False  # Salimans et al. 2016 layer before D's output
    upsample: str = "transposed"  # G's 2x steps (dcgan, wgan_gp, sngan): transposed conv or resize-conv; mlp has none

    def __post_init__(self) -> None:
        for name in ("latent_dim", "channels", "base_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (unconditional) or positive, got {self.num_classes}")
        resolution_steps(self.image_size)
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {self.upsample!r}")
