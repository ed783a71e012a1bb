"""Differentiable augmentation of everything D sees: DiffAugment (Zhao et al., 2020), always on, and ADA
(Karras et al., 2020), each op applied to each image with a probability p that `AdaptiveAugment` steers.

DiffAugment follows the reference DiffAugment_pytorch.py of mit-han-lab/data-efficient-gans. Random numbers
are drawn on the CPU from `generator` and then moved to the images' device, so a seed gives the same
augmentations on CPU and GPU.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

ADAPTIVE = "ada"
POLICIES = ("color", "translation", "cutout", "flip")  # the fixed DiffAugment ops; ("ada",) adapts them
# ADA's pipeline from the ops above, in this order, each gated per image by p.
ADA_OPS = ("flip", "translation", "color", "cutout")
ADA_TARGET = 0.6  # r_t = E[sign(D(real))] that p is steered to (Karras et al. 2020)
ADA_INTERVAL = 4  # G steps between moves of p, as in the paper

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _uniform(n: int, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One U(0, 1) draw per image, shaped (N, 1, 1, 1) to broadcast over C, H, W."""
    return torch.rand(n, 1, 1, 1, generator=generator).to(device=images.device, dtype=images.dtype)


def _randint(low: int, high: int, n: int, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One integer in [low, high) per image, shaped (N, 1, 1) to broadcast over H, W."""
    return torch.randint(low, high, (n, 1, 1), generator=generator).to(images.device)


def _color(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n = images.shape[0]
    images = images + (_uniform(n, images, generator) - 0.5)
    channel_mean = images.mean(dim=1, keepdim=True)
    images = (images - channel_mean) * (_uniform(n, images, generator) * 2.0) + channel_mean
    image_mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - image_mean) * (_uniform(n, images, generator) + 0.5) + image_mean


def _translation(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n, _, h, w = images.shape
    max_dy, max_dx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = _randint(-max_dy, max_dy + 1, n, images, generator)
    dx = _randint(-max_dx, max_dx + 1, n, images, generator)
    # Source indices into a one-pixel zero border; clamping onto that border is the zero padding.
    rows = (torch.arange(h, device=images.device).view(1, h, 1) + dy + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=images.device).view(1, 1, w) + dx + 1).clamp(0, w + 1)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    padded = F.pad(images, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n, _, h, w = images.shape
    size_h, size_w = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    # Centres range over the whole image, so a square can hang over the border and is clipped there.
    top = _randint(0, h + (1 - size_h % 2), n, images, generator) - size_h // 2
    left = _randint(0, w + (1 - size_w % 2), n, images, generator) - size_w // 2
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    return images * (~inside).unsqueeze(1).to(images.dtype)


def _flip(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (ADA's xflip)."""
    mirrored = _uniform(images.shape[0], images, generator) < 0.5
    return torch.where(mirrored, images.flip(3), images)


_AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "color": _color,
    "translation": _translation,
    "cutout": _cutout,
    "flip": _flip,
}


def diff_augment(
    images: torch.Tensor, policy: tuple[str, ...] | list[str], generator: torch.Generator | None = None,
    probability: float = 1.0,
) -> torch.Tensor:
    """Augment (N, C, H, W) images in [-1, 1] with the named policies, in order, differentiably.

    Apply it to every image D sees: reals and fakes in the discriminator step and fakes in the
    generator step; augmenting only the reals would teach G to produce augmented images.
    `generator` is a CPU torch.Generator (None: torch's global CPU generator). An empty policy
    returns `images` unchanged. The policy `("ada",)` runs ADA_OPS, each on each image with `probability`
    (ADA's p); p = 0 returns `images` unchanged and draws no random numbers.
    """
    if isinstance(policy, str):
        raise TypeError(f"policy must be a sequence of names such as ('color', 'translation'), not {policy!r}")
    unknown = [name for name in policy if name not in (*POLICIES, ADAPTIVE)]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; valid policies: {', '.join(POLICIES)}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if ADAPTIVE in policy:
        if tuple(policy) != (ADAPTIVE,):
            raise ValueError(f"'{ADAPTIVE}' adapts its own ops ({', '.join(ADA_OPS)}); use it alone, not with {policy}")
        return _adaptive(images, generator, probability) if probability > 0 else images
    for name in policy:
        images = _AUGMENTATIONS[name](images, generator)
    return images


def _adaptive(images: torch.Tensor, generator: torch.Generator | None, probability: float) -> torch.Tensor:
    for name in ADA_OPS:
        chosen = _uniform(images.shape[0], images, generator) < probability
        images = torch.where(chosen, _AUGMENTATIONS[name](images, generator), images)
    return images


class AdaptiveAugment:
    """ADA's p: every `interval` G steps it moves by sign(r_t - target) * images / adjust_images, where
    r_t = E[sign(D(real))] over the real images D saw since the last move (Karras et al. 2020, eq. 1 and
    section 3.1). Under torch.distributed the sums are all-reduced first, so every worker holds the same p.
    p, and what was seen since the last move, are its `state_dict` (a resume continues exactly); the speed
    comes with each `observe` from the recipe."""

    def __init__(self, target: float = ADA_TARGET, interval: int = ADA_INTERVAL) -> None:
        self.target, self.interval = target, interval
        self.probability, self.sign_sum, self.seen, self.steps = 0.0, 0.0, 0, 0

    def observe(self, real_sign_mean: float, count: int, adjust_images: int, device: torch.device) -> None:
        """Count one step's `count` real logits of mean sign `real_sign_mean`; move p every `interval` steps
        by at most (images seen) / adjust_images."""
        if adjust_images < 1:
            raise ValueError(f"adjust_images must be positive, got {adjust_images}")
        self.sign_sum += real_sign_mean * count
        self.seen += count
        self.steps += 1
        if self.steps % self.interval:
            return
        totals = torch.tensor([self.sign_sum, float(self.seen)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = totals.to(device if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(totals)
        sign_sum, seen = totals.cpu().tolist()
        move = seen / adjust_images
        self.probability = min(max(self.probability + (move if sign_sum / seen > self.target else -move), 0.0), 1.0)
        self.sign_sum, self.seen = 0.0, 0

    def state_dict(self) -> dict[str, float | int]:
        return {"probability": self.probability, "sign_sum": self.sign_sum, "seen": self.seen, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.probability, self.sign_sum = float(state["probability"]), float(state["sign_sum"])
        self.seen, self.steps = int(state["seen"]), int(state["steps"])
