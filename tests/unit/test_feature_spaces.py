"""The metric feature spaces see what a person sees: validated on RGB shapes, with labels and without.

Each space is trained here as the featurenet stage trains it (a classifier with labels, a SimCLR encoder
without), then checked: two independent real samples are close; FID grows with the strength of noise and of
blur; losing half of the modes (half of the k-means clusters of the real features) costs FID; and collapse
to one mode is caught by the health check, which counts k-means modes of the features in both spaces.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPE_KINDS, shapes, tiny_params

from gancore.contrastive import nt_xent, random_view
from gancore.health import ModeCollapseError, check_mode_collapse, class_coverage
from gancore.images import from_uint8
from gancore.metrics import extract, fid
from gancore.metrics.features import pseudo_class_centroids, pseudo_classes
from pipelines.config import FeaturenetParams, HealthParams
from pipelines.dataset import DatasetError
from pipelines.stages.featurenet import MIN_ENCODER_IMAGES, reference, train_encoder, train_featurenet
from pipelines.worker import evaluate_samples, health_problem



def blur(images: torch.Tensor, passes: int) -> torch.Tensor:
    kernel = torch.full((3, 1, 3, 3), 1 / 9)
    for _ in range(passes):
        images = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return images


@pytest.fixture(scope="module", params=["classifier", "contrastive"])
def space(request):
    """(featurenet, real features of a second held-out sample, the held-out images themselves, and the
    reference the featurenet stage stores for training's checks: with the held-out labels where it has any)."""
    settings = FeaturenetParams(epochs=6, encoder_steps=96, batch_size=64, lr=0.002, feature_dim=64, seed=0, reference_images=512)
    images, kinds = shapes(1024, seed=0)
    if request.param == "classifier":
        featurenet = train_featurenet(images, kinds, SHAPE_KINDS, settings)
    else:
        featurenet = train_encoder(images, settings)
    held_out, held_out_kinds = shapes(600, seed=1)
    second, _ = shapes(600, seed=2)
    stored = reference(featurenet, held_out, held_out_kinds if request.param == "classifier" else None)
    return featurenet, extract(featurenet, from_uint8(second))[0], from_uint8(held_out), stored


def distance(space, images: torch.Tensor) -> float:
    featurenet, reference, *_ = space
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
    featurenet, _, real, _ = space
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


class Replay(torch.nn.Module):
    """A stand-in generator: image i for latent i (wrapping around), labels ignored."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.served = getattr(self, "served", 0) + len(z)
        return self.images[torch.arange(self.served - len(z), self.served) % len(self.images)]


def test_training_stops_a_run_collapsed_onto_one_mode_in_either_space(space):
    """The worker's own check, on the reference the featurenet stage stores: real images pass, one image
    repeated (with noise) is stopped as collapsed, whether the space was learnt with labels or without."""
    featurenet, _, real, stored = space
    health = HealthParams(**tiny_params()["train"]["health"] | {"samples": 400, "min_class_coverage": 0.3,
                                                                "min_diversity": 0.25, "warmup_steps": 0})
    config = SimpleNamespace(model=SimpleNamespace(num_classes=0, latent_dim=8), health=health)
    reference_of = {"classifier": featurenet, **stored}
    collapsed = real[:1] + 0.01 * torch.randn(real.shape, generator=torch.Generator().manual_seed(4))
    steady = {"loss_d": 1.0, "loss_g": 1.0, "grad_norm_d": 1.0, "grad_norm_g": 1.0}
    judged = {}
    for name, images in (("real", real), ("collapsed", collapsed)):
        metrics = evaluate_samples(Replay(images), reference_of, config, "cpu")
        judged[name] = metrics["class_coverage"], health_problem(500, {**steady, **metrics}, health)
    assert judged["real"][0] > 0.8 and judged["real"][1] is None, judged
    assert judged["collapsed"][0] < 0.1 and "mode collapse" in judged["collapsed"][1], judged


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
    settings = FeaturenetParams(epochs=1, encoder_steps=16, batch_size=64, lr=0.002, feature_dim=64, seed=0, reference_images=64)
    with pytest.raises(DatasetError, match=f"needs at least {MIN_ENCODER_IMAGES}"):
        train_encoder(shapes(100, seed=0)[0], settings)
