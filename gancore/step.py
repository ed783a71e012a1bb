"""One training step (critic updates, then one generator update); every runner calls this."""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from gancore.augment import diff_augment
from gancore.ema import unwrap
from gancore.health import gradient_norm
from gancore.losses import discriminator_loss, generator_loss
from gancore.regularizers import feature_matching_loss, gradient_penalty, r1_penalty


@dataclass(frozen=True)
class StepSettings:
    """The training recipe of one step; the pipeline fills it from params.yaml."""

    latent_dim: int
    loss: str
    num_classes: int  # 0: unconditional
    critic_steps: int  # D updates per G update (5 for WGAN-GP)
    gradient_penalty: float  # lambda of Gulrajani et al. 2017; 0 disables
    r1_gamma: float  # gamma of Mescheder et al. 2018; 0 disables
    label_smoothing: float  # one-sided: D's target for real samples is 1 - label_smoothing
    feature_matching: float  # weight of Salimans et al.'s feature-matching term in G's loss
    augment: tuple[str, ...]  # DiffAugment policy, applied to every image D sees; ("ada",): adaptive
    ada_adjust_images: int = 100_000  # ADA: images over which p can move from 0 to 1
    mode_seeking: float = 0.0  # weight of Mao et al. 2019's mode-seeking term in G's loss; 0 disables


def sample_latent(
    n: int, latent_dim: int, device: torch.device | str, noise_generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal latents of shape (n, latent_dim), drawn on the CPU so every device gets the same values."""
    return torch.randn(n, latent_dim, generator=noise_generator).to(device)


def sample_labels(
    n: int, num_classes: int, device: torch.device | str, noise_generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """Uniform class labels for fakes, or None for an unconditional model."""
    if num_classes == 0:
        return None
    return torch.randint(num_classes, (n,), generator=noise_generator).to(device)


def requested_labels(count: int, num_classes: int) -> torch.Tensor | None:
    """The labels generate_images gives a conditional generator: 0, 1, ..., num_classes - 1, 0, 1, ...
    (equal counts per class); None for an unconditional model."""
    return torch.arange(count) % num_classes if num_classes else None


@torch.no_grad()
def generate_images(
    generator: nn.Module, count: int, latent_dim: int, seed: int, device: torch.device | str = "cpu",
    batch_size: int = 256, num_classes: int = 0,
) -> torch.Tensor:
    """`count` samples on the CPU from latents drawn with `seed`, in batches (same seed, same images);
    a conditional generator is asked for `requested_labels(count, num_classes)`."""
    noise = torch.Generator().manual_seed(seed)
    labels = requested_labels(count, num_classes)
    batches = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        batch_labels = labels[start : start + size].to(device) if num_classes else None
        batches.append(generator(sample_latent(size, latent_dim, device, noise), batch_labels).cpu())
    return torch.cat(batches)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No weight gradients for `module` inside the block; its parameters' previous flags after it."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)


@dataclass(frozen=True)
class _StepContext:
    """What both updates of one step share: the recipe, the noise, the device and the per-update batch."""

    settings: StepSettings
    noise_generator: torch.Generator | None
    autocast_dtype: torch.dtype | None
    device: torch.device
    batch_size: int
    augment_probability: float

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, self.settings.augment, self.noise_generator, self.augment_probability)

    def forward_pass(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def fakes(self, generator: nn.Module, paired: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """A batch of generated images, the labels they were asked for (drawn first) and their latents.
        `paired`: the second half of the batch asks for the first half's labels (mode seeking compares them)."""
        settings = self.settings
        count = self.batch_size // 2 if paired else self.batch_size
        fake_labels = sample_labels(count, settings.num_classes, self.device, self.noise_generator)
        if paired and fake_labels is not None:
            fake_labels = torch.cat([fake_labels, fake_labels, fake_labels[: self.batch_size % 2]])
        latents = sample_latent(self.batch_size, settings.latent_dim, self.device, self.noise_generator)
        return generator(latents, fake_labels), fake_labels, latents


def mode_seeking_loss(fake: torch.Tensor, latents: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mao et al. 2019 (MSGAN): 1 / (mean |G(z1) - G(z2)| / mean |z1 - z2| + eps) over the pairs (first half,
    second half) of a batch that asked for the same labels; small when different latents give different images,
    so a conditional G cannot map all the noise of a class onto one prototype."""
    half = fake.shape[0] // 2
    images = (fake[:half] - fake[half : 2 * half]).abs().flatten(1).mean(1)
    noise = (latents[:half] - latents[half : 2 * half]).abs().mean(1)
    return (1.0 / (images / noise + eps)).mean()


def _discriminator_update(step: _StepContext, generator: nn.Module, discriminator: nn.Module,
                          optimizer: torch.optim.Optimizer, real: torch.Tensor, labels: torch.Tensor | None):
    """One D update on `real` and a fresh fake batch; (loss, real logits, fake logits, gradient norm)."""
    settings = step.settings
    with torch.no_grad(), step.forward_pass():
        fake, fake_labels, _ = step.fakes(generator)
    with step.forward_pass():
        # Real and fake go through D separately so BatchNorm never mixes their statistics.
        real_logits = discriminator(step.augment(real), labels).float()
        fake_logits = discriminator(step.augment(fake), fake_labels).float()
        loss_d = discriminator_loss(settings.loss, real_logits, fake_logits, 1.0 - settings.label_smoothing)
        if settings.gradient_penalty:
            mix = torch.rand(step.batch_size, generator=step.noise_generator)
            # Interpolating between a real and a fake of different classes has no single label;
            # the real one is used, as in conditional WGAN-GP implementations.
            loss_d = loss_d + settings.gradient_penalty * gradient_penalty(
                unwrap(discriminator), real, fake, labels, mix
            )
        if settings.r1_gamma:
            loss_d = loss_d + 0.5 * settings.r1_gamma * r1_penalty(unwrap(discriminator), real, labels)
    optimizer.zero_grad(set_to_none=True)
    loss_d.backward()
    grad_norm_d = gradient_norm(discriminator.parameters())
    optimizer.step()
    return loss_d, real_logits, fake_logits, grad_norm_d


def _generator_update(step: _StepContext, generator: nn.Module, discriminator: nn.Module,
                      optimizer: torch.optim.Optimizer, real: torch.Tensor, labels: torch.Tensor | None):
    """One G update against D; (loss, gradient norm). `real` feeds the feature-matching term only."""
    settings = step.settings
    # G's update reaches D's input gradients only: D runs unwrapped (no DDP all-reduce of gradients
    # nobody uses) with its weights frozen (no weight gradients computed).
    critic = unwrap(discriminator)
    with step.forward_pass(), frozen(critic):
        fake, fake_labels, latents = step.fakes(generator, paired=settings.mode_seeking > 0)
        if settings.feature_matching:
            fake_logits, fake_features = critic(step.augment(fake), fake_labels, return_features=True)
            with torch.no_grad():
                _, real_features = critic(step.augment(real), labels, return_features=True)
            loss_g = generator_loss(settings.loss, fake_logits.float())
            loss_g = loss_g + settings.feature_matching * feature_matching_loss(real_features.float(),
                                                                                fake_features.float())
        else:
            loss_g = generator_loss(settings.loss, critic(step.augment(fake), fake_labels).float())
        if settings.mode_seeking:
            loss_g = loss_g + settings.mode_seeking * mode_seeking_loss(fake.float(), latents)
    optimizer.zero_grad(set_to_none=True)
    loss_g.backward()  # the graph was built with D's weights frozen, so they get no gradients here either
    grad_norm_g = gradient_norm(generator.parameters())
    optimizer.step()
    return loss_g, grad_norm_g


def train_step(
    generator: nn.Module,
    discriminator: nn.Module,
    generator_optimizer: torch.optim.Optimizer,
    discriminator_optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    labels: torch.Tensor | None,
    settings: StepSettings,
    noise_generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    augment_probability: float = 1.0,
) -> dict[str, float]:
    """`settings.critic_steps` D updates, one per equal chunk of `real`, then one G update.

    Returns the last D update's loss and mean logits, the mean sign of its real logits (ADA's r_t), G's loss
    and both gradient norms. `augment_probability` is ADA's p when `settings.augment` is ("ada",).
    `generator` and `discriminator` may be DDP wrappers; all randomness comes from `noise_generator`.
    `autocast_dtype` (e.g. torch.bfloat16 on GPUs) runs the forward passes under autocast; the
    backward passes and optimizer steps stay outside it, as PyTorch recommends.
    """
    if settings.num_classes and labels is None:
        raise ValueError("a conditional model needs the real images' labels")
    batch_size = real.shape[0] // settings.critic_steps
    if batch_size == 0 or real.shape[0] % settings.critic_steps:
        raise ValueError(f"a batch of {real.shape[0]} cannot be split evenly into {settings.critic_steps} critic steps")
    step = _StepContext(settings, noise_generator, autocast_dtype, real.device, batch_size, augment_probability)
    for critic_step in range(settings.critic_steps):
        chunk = slice(critic_step * batch_size, (critic_step + 1) * batch_size)
        real_chunk, real_labels = real[chunk], labels[chunk] if labels is not None else None
        loss_d, real_logits, fake_logits, grad_norm_d = _discriminator_update(
            step, generator, discriminator, discriminator_optimizer, real_chunk, real_labels)
    loss_g, grad_norm_g = _generator_update(step, generator, discriminator, generator_optimizer, real_chunk,
                                            real_labels)
    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": real_logits.detach().mean().item(),
        "d_fake": fake_logits.detach().mean().item(),
        "d_real_sign": real_logits.detach().sign().mean().item(),
        "grad_norm_d": grad_norm_d,
        "grad_norm_g": grad_norm_g,
    }
