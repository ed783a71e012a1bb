"""DiffAugment: differentiable augmentation for data-efficient GAN training (Zhao et al., 2020).

Follows the reference DiffAugment_pytorch.py of mit-han-lab/data-efficient-gans. Random numbers are
drawn on the CPU from `generator` and then moved to the images' device, so a seed gives the same
augmentations on CPU and GPU.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")

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


_AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "color": _color,
    "translation": _translation,
    "cutout": _cutout,
}


def diff_augment(
    images: torch.Tensor, policy: tuple[str, ...] | list[str], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment (N, C, H, W) images in [-1, 1] with the named policies, in order, differentiably.

    Apply it to every image D sees: reals and fakes in the discriminator step and fakes in the
    generator step; augmenting only the reals would teach G to produce augmented images.
    `generator` is a CPU torch.Generator (None: torch's global CPU generator). An empty policy
    returns `images` unchanged.
    """
    if isinstance(policy, str):
        raise TypeError(f"policy must be a sequence of names such as ('color', 'translation'), not {policy!r}")
    unknown = [name for name in policy if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; valid policies: {', '.join(POLICIES)}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    for name in policy:
        images = _AUGMENTATIONS[name](images, generator)
    return images
