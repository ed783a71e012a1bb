"""Self-supervised metric features for unlabelled data: SimCLR (Chen et al. 2020).

An encoder learns features that agree between two random views of the same image and differ from the
other images' (the NT-Xent loss). With no class labels to learn from, this is what makes a feature space
see shapes and colours rather than noise; Morozov et al. 2021 argue for such self-supervised features in
GAN evaluation. The views use the DiffAugment policies (colour, translation, cutout) plus a random
horizontal flip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gancore.augment import diff_augment

VIEW_POLICIES = ("color", "translation", "cutout")


def random_view(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image (N, C, H, W) in [-1, 1]: flipped half the time, then augmented."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    flipped = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    return diff_augment(flipped, VIEW_POLICIES, generator)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy of two batches of projections, row i of each being two
    views of image i: each view must pick its partner out of the other 2N - 2 views."""
    if first.shape != second.shape or first.ndim != 2 or len(first) < 2:
        raise ValueError(f"need two (N >= 2, D) batches of the same shape, got {tuple(first.shape)}"
                         f" and {tuple(second.shape)}")
    views = F.normalize(torch.cat([first, second]), dim=1)
    similarity = views @ views.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own partner
    count = len(first)
    partners = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(first.device)
    return F.cross_entropy(similarity, partners)
