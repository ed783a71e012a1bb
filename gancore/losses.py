"""GAN objectives on raw discriminator logits.

Each discriminator loss is the mean over real plus the mean over fake samples; each generator
loss is what the generator minimises.
"""

import torch
import torch.nn.functional as F

LOSSES = ("non_saturating", "minimax", "hinge", "wasserstein", "least_squares")


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; valid losses: {', '.join(LOSSES)}")


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Scalar loss the discriminator minimises."""
    _check(kind)
    if kind in ("non_saturating", "minimax"):
        # -log(sigmoid(r)) - log(1 - sigmoid(f)), written with softplus for stability.
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "wasserstein":
        return fake_logits.mean() - real_logits.mean()
    return 0.5 * (real_logits - 1.0).square().mean() + 0.5 * fake_logits.square().mean()


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Scalar loss the generator minimises."""
    _check(kind)
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "minimax":
        # log(1 - sigmoid(f)) = -softplus(f): the original game's generator objective.
        return -F.softplus(fake_logits).mean()
    if kind in ("hinge", "wasserstein"):
        return -fake_logits.mean()
    return 0.5 * (fake_logits - 1.0).square().mean()
