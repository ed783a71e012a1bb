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
    augment: tuple[str, ...]  # DiffAugment policy, applied to every image D sees


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
) -> dict[str, float]:
    """`settings.critic_steps` D updates, one per equal chunk of `real`, then one G update.

    Returns the last D update's loss and mean logits, G's loss and both gradient norms.
    `generator` and `discriminator` may be DDP wrappers; all randomness comes from `noise_generator`.
    `autocast_dtype` (e.g. torch.bfloat16 on GPUs) runs the forward passes under autocast; the
    backward passes and optimizer steps stay outside it, as PyTorch recommends.
    """
    if settings.num_classes and labels is None:
        raise ValueError("a conditional model needs the real images' labels")
    device = real.device
    batch_size = real.shape[0] // settings.critic_steps
    if batch_size == 0 or real.shape[0] % settings.critic_steps:
        raise ValueError(f"a batch of {real.shape[0]} cannot be split evenly into {settings.critic_steps} critic steps")

    def augment(images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, settings.augment, noise_generator)

    def forward_pass() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    real_target = 1.0 - settings.label_smoothing
    for critic_step in range(settings.critic_steps):
        chunk = slice(critic_step * batch_size, (critic_step + 1) * batch_size)
        real_chunk = real[chunk]
        real_labels = labels[chunk] if labels is not None else None
        with torch.no_grad(), forward_pass():
            fake_labels = sample_labels(batch_size, settings.num_classes, device, noise_generator)
            fake = generator(sample_latent(batch_size, settings.latent_dim, device, noise_generator), fake_labels)
        with forward_pass():
            # Real and fake go through D separately so BatchNorm never mixes their statistics.
            real_logits = discriminator(augment(real_chunk), real_labels).float()
            fake_logits = discriminator(augment(fake), fake_labels).float()
            loss_d = discriminator_loss(settings.loss, real_logits, fake_logits, real_target)
            if settings.gradient_penalty:
                mix = torch.rand(batch_size, generator=noise_generator)
                # Interpolating between a real and a fake of different classes has no single label;
                # the real one is used, as in conditional WGAN-GP implementations.
                loss_d = loss_d + settings.gradient_penalty * gradient_penalty(
                    unwrap(discriminator), real_chunk, fake, real_labels, mix
                )
            if settings.r1_gamma:
                loss_d = loss_d + 0.5 * settings.r1_gamma * r1_penalty(unwrap(discriminator), real_chunk, real_labels)
        discriminator_optimizer.zero_grad(set_to_none=True)
        loss_d.backward()
        grad_norm_d = gradient_norm(discriminator.parameters())
        discriminator_optimizer.step()

    # G's update reaches D's input gradients only: D runs unwrapped (no DDP all-reduce of gradients
    # nobody uses) with its weights frozen (no weight gradients computed).
    critic = unwrap(discriminator)
    with forward_pass(), frozen(critic):
        fake_labels = sample_labels(batch_size, settings.num_classes, device, noise_generator)
        fake = generator(sample_latent(batch_size, settings.latent_dim, device, noise_generator), fake_labels)
        if settings.feature_matching:
            fake_logits_g, fake_features = critic(augment(fake), fake_labels, return_features=True)
            with torch.no_grad():
                _, real_features = critic(augment(real_chunk), real_labels, return_features=True)
            loss_g = generator_loss(settings.loss, fake_logits_g.float())
            loss_g = loss_g + settings.feature_matching * feature_matching_loss(real_features.float(),
                                                                                fake_features.float())
        else:
            loss_g = generator_loss(settings.loss, critic(augment(fake), fake_labels).float())
    generator_optimizer.zero_grad(set_to_none=True)
    loss_g.backward()  # the graph was built with D's weights frozen, so they get no gradients here either
    grad_norm_g = gradient_norm(generator.parameters())
    generator_optimizer.step()

    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": real_logits.detach().mean().item(),
        "d_fake": fake_logits.detach().mean().item(),
        "grad_norm_d": grad_norm_d,
        "grad_norm_g": grad_norm_g,
    }
