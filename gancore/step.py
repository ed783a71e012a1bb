"""One discriminator update followed by one generator update; every runner calls this."""

import torch
from torch import nn

from gancore.losses import discriminator_loss, generator_loss


def sample_latent(
    n: int, latent_dim: int, device: torch.device | str, noise_generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal latents of shape (n, latent_dim)."""
    return torch.randn(n, latent_dim, generator=noise_generator, device=device)


@torch.no_grad()
def generate_images(
    generator: nn.Module, count: int, latent_dim: int, seed: int, device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """`count` samples on the CPU from latents drawn with `seed`, in batches (same seed, same images)."""
    noise = torch.Generator().manual_seed(seed)
    return torch.cat([
        generator(sample_latent(min(batch_size, count - start), latent_dim, "cpu", noise).to(device)).cpu()
        for start in range(0, count, batch_size)
    ])


def train_step(
    generator: nn.Module,
    discriminator: nn.Module,
    generator_optimizer: torch.optim.Optimizer,
    discriminator_optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    latent_dim: int,
    loss: str,
    noise_generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Update D on `real` vs. detached fakes, then G on fresh latents; returns the step's losses and mean logits."""
    batch_size = real.shape[0]

    with torch.no_grad():
        fake = generator(sample_latent(batch_size, latent_dim, real.device, noise_generator))
    # Real and fake go through D separately so BatchNorm never mixes their statistics.
    real_logits = discriminator(real)
    fake_logits = discriminator(fake)
    loss_d = discriminator_loss(loss, real_logits, fake_logits)
    discriminator_optimizer.zero_grad(set_to_none=True)
    loss_d.backward()
    discriminator_optimizer.step()

    # D keeps requires_grad: toggling it would break DDP's reducer. The gradients D picks up
    # here are cleared by zero_grad before its next update.
    fake_logits_g = discriminator(generator(sample_latent(batch_size, latent_dim, real.device, noise_generator)))
    loss_g = generator_loss(loss, fake_logits_g)
    generator_optimizer.zero_grad(set_to_none=True)
    loss_g.backward()
    generator_optimizer.step()

    return {
        "loss_d": loss_d.item(),
        "loss_g": loss_g.item(),
        "d_real": real_logits.detach().mean().item(),
        "d_fake": fake_logits.detach().mean().item(),
    }
