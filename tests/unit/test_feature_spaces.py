"""The metric feature spaces see what a person sees: validated on RGB shapes, with labels and without.

Each space is trained here as the featurenet stage trains it (a classifier with labels, a SimCLR encoder
without), then checked: two independent real samples are close; FID grows with the strength of noise and of
blur; losing half of the modes (half of the k-means clusters of the real features) costs FID; and collapse
to one mode is caught by the label-free health check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPE_KINDS, shapes

from gancore.contrastive import nt_xent, random_view
from gancore.health import ModeCollapseError, check_mode_collapse, class_coverage
from gancore.images import from_uint8
from gancore.metrics import extract, fid
from gancore.metrics.features import pseudo_class_centroids, pseudo_classes
from pipelines.config import FeaturenetParams
from pipelines.dataset import DatasetError
from pipelines.featurenet import MIN_ENCODER_IMAGES, train_encoder, train_featurenet



def blur(images: torch.Tensor, passes: int) -> torch.Tensor:
    kernel = torch.full((3, 1, 3, 3), 1 / 9)
    for _ in range(passes):
        images = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return images


@pytest.fixture(scope="module", params=["classifier", "contrastive"])
def space(request):
    """(featurenet, real features of a second held-out sample, and the held-out images themselves)."""
    settings = FeaturenetParams(epochs=6, batch_size=64, lr=0.002, feature_dim=64, seed=0, reference_images=512)
    images, kinds = shapes(1024, seed=0)
    if request.param == "classifier":
        featurenet = train_featurenet(images, kinds, SHAPE_KINDS, settings)
    else:
        featurenet = train_encoder(images, settings)
    held_out, _ = shapes(600, seed=1)
    second, _ = shapes(600, seed=2)
    return featurenet, extract(featurenet, from_uint8(second))[0], from_uint8(held_out)


def distance(space, images: torch.Tensor) -> float:
    featurenet, reference, _ = space
    return fid(extract(featurenet, images.clamp(-1, 1))[0], reference)


def test_real_against_real_is_small_and_noise_and_blur_cost_more_with_strength(space):
    real = space[2]
    noisy = [distance(space, real + strength * torch.randn(real.shape, generator=torch.Generator().manual_seed(3)))
             for strength in (0.0, 0.2, 0.5, 1.0)]
    blurred = [distance(space, blur(real, passes)) for passes in (1, 2, 4)]
    assert noisy == sorted(noisy) and noisy[1] > 1.5 * noisy[0], f"FID must grow with noise: {noisy}"
    assert [noisy[0], *blurred] == sorted([noisy[0], *blurred]), f"FID must grow with blur: {noisy[0]}, {blurred}"
    assert blurred[-1] > 3 * noisy[0], "heavily blurred images must not score as real"


def test_dropping_half_of_the_modes_costs_fid_and_collapse_is_caught_without_labels(space):
    featurenet, _, real = space
    features = extract(featurenet, real)[0]
    centroids = pseudo_class_centroids(features, classes=10)
    modes = pseudo_classes(features, centroids)
    kept = np.isin(modes, np.unique(modes)[: len(np.unique(modes)) // 2])
    assert distance(space, real[torch.from_numpy(kept)]) > 2 * distance(space, real), "half the modes is worse"

    full = class_coverage(modes, len(centroids))
    collapsed = real[:1].repeat(len(real), 1, 1, 1) + 0.01 * torch.randn(real.shape,
                                                                         generator=torch.Generator().manual_seed(4))
    one_mode = class_coverage(pseudo_classes(extract(featurenet, collapsed)[0], centroids), len(centroids))
    assert full > 0.8 and one_mode < 0.1
    check_mode_collapse(500, full, 1.0, min_coverage=0.3, min_diversity=0.25)
    with pytest.raises(ModeCollapseError, match="class coverage"):
        check_mode_collapse(500, one_mode, 1.0, min_coverage=0.3, min_diversity=0.25)


def test_nt_xent_rewards_agreeing_views_and_views_of_an_image_agree():
    generator = torch.Generator().manual_seed(0)
    projections = torch.randn(32, 16, generator=generator)
    shuffled = projections[torch.randperm(32, generator=generator)]
    assert nt_xent(projections, projections) < nt_xent(projections, shuffled)
    images = from_uint8(shapes(8, seed=5)[0])
    view = random_view(images, torch.Generator().manual_seed(1))
    assert view.shape == images.shape and not torch.equal(view, images)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(projections, projections[:8])


def test_an_encoder_needs_enough_images():
    settings = FeaturenetParams(epochs=1, batch_size=64, lr=0.002, feature_dim=64, seed=0, reference_images=64)
    with pytest.raises(DatasetError, match=f"needs at least {MIN_ENCODER_IMAGES}"):
        train_encoder(shapes(100, seed=0)[0], settings)
