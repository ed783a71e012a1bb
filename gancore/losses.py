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


# Losses with a target for real samples, which one-sided label smoothing can lower.
SMOOTHABLE = ("non_saturating", "minimax", "least_squares")


def discriminator_loss(
    kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor, real_target: float = 1.0
) -> torch.Tensor:
    """Scalar loss the discriminator minimises.

    `real_target` < 1 is one-sided label smoothing (Salimans et al. 2016): only the real
    target moves, since smoothing the fake target rewards the generator for its mistakes.
    """
    _check(kind)
    if real_target != 1.0 and kind not in SMOOTHABLE:
        raise ValueError(f"label smoothing needs a loss with a real target ({', '.join(SMOOTHABLE)}), not {kind!r}")
    if kind in ("non_saturating", "minimax"):
        # Binary cross-entropy on logits, written with softplus for stability.
        real_term = real_target * F.softplus(-real_logits) + (1.0 - real_target) * F.softplus(real_logits)
        return real_term.mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "wasserstein":
        return fake_logits.mean() - real_logits.mean()
    return 0.5 * (real_logits - real_target).square().mean() + 0.5 * fake_logits.square().mean()


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
