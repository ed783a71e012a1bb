"""A GAN's training state (G, D, the EMA of G, two Adam optimisers) and the one iteration every runner repeats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gancore.augment import ADAPTIVE, AdaptiveAugment
from gancore.ema import ExponentialMovingAverage, unwrap
from gancore.models import ModelSpec, build_gan
from gancore.step import StepSettings, train_step


# How G and D are wrapped for data parallelism: separately, and D runs twice per update (real, fake) before
# backward, which only works when DDP does not re-broadcast batch-norm buffers on every forward.
DDP_OPTIONS = {"forward_sync_buffers": False}


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam for G and D: separate learning rates, shared betas."""

    lr_g: float
    lr_d: float
    beta1: float
    beta2: float


@dataclass
class TrainingState:
    """Everything a checkpoint must hold to continue a run bit for bit (besides data position and RNGs).

    `generator` and `discriminator` may be replaced by DDP wrappers after `create`; `ema.module` is the
    generator to sample from.
    """

    generator: nn.Module
    discriminator: nn.Module
    ema: ExponentialMovingAverage
    generator_optimizer: torch.optim.Optimizer
    discriminator_optimizer: torch.optim.Optimizer
    adaptive_augment: AdaptiveAugment = field(default_factory=AdaptiveAugment)  # ADA's p (used with augment: ada)

    @classmethod
    def create(cls, spec: ModelSpec, optimizer: OptimizerSettings, ema_decay: float, seed: int) -> TrainingState:
        """Fresh G and D initialised from `seed` (identical on every worker), their EMA and optimisers."""
        torch.manual_seed(seed)
        generator, discriminator = build_gan(spec)
        betas = (optimizer.beta1, optimizer.beta2)
        return cls(
            generator=generator,
            discriminator=discriminator,
            ema=ExponentialMovingAverage(generator, ema_decay),
            generator_optimizer=torch.optim.Adam(generator.parameters(), lr=optimizer.lr_g, betas=betas),
            discriminator_optimizer=torch.optim.Adam(discriminator.parameters(), lr=optimizer.lr_d, betas=betas),
        )

    def iteration(self, real: torch.Tensor, labels: torch.Tensor | None, settings: StepSettings,
                  noise_generator: torch.Generator, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
        """One train_step (critic updates, one G update), then the EMA update (and with ADA, the move of p);
        returns train_step's numbers, and ADA's p (`augment_p`) when it adapts."""
        adaptive = ADAPTIVE in settings.augment
        losses = train_step(self.generator, self.discriminator, self.generator_optimizer,
                            self.discriminator_optimizer, real, labels, settings, noise_generator, autocast_dtype,
                            self.adaptive_augment.probability if adaptive else 1.0)
        self.ema.update(self.generator)
        if adaptive:
            losses["augment_p"] = self.adaptive_augment.probability  # the p this step trained with
            self.adaptive_augment.observe(losses["d_real_sign"], real.shape[0] // settings.critic_steps,
                                          settings.ada_adjust_images, real.device)
        return losses

    def set_optimizer(self, optimizer: OptimizerSettings) -> None:
        """Apply learning rates and betas to both optimisers (a restored state keeps the ones it was saved with)."""
        betas = (optimizer.beta1, optimizer.beta2)
        for adam, lr in ((self.generator_optimizer, optimizer.lr_g), (self.discriminator_optimizer, optimizer.lr_d)):
            for group in adam.param_groups:
                group.update(lr=lr, betas=betas)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": unwrap(self.generator).state_dict(),
            "discriminator": unwrap(self.discriminator).state_dict(),
            "generator_ema": self.ema.module.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "adaptive_augment": self.adaptive_augment.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.generator).load_state_dict(state["generator"])
        unwrap(self.discriminator).load_state_dict(state["discriminator"])
        self.ema.module.load_state_dict(state["generator_ema"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.adaptive_augment.load_state_dict(state["adaptive_augment"])
