"""What the quality benchmarks share: the pipeline's own prepared data and featurenet (run
`dvc repro featurenet` first), and a plain single-process training loop over gancore.

Run from the repository root (they read params.yaml, data/prepared and models/featurenet.pt).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gancore.images import from_uint8
from gancore.metrics import extract, fid
from gancore.models.classifier import Classifier
from gancore.step import generate_images
from gancore.training import OptimizerSettings, TrainingState
from pipelines.artifacts import FEATURENET_FILE, PREPARED_DIR, ArtifactError, load_featurenet
from pipelines.config import Params
from pipelines.dataset import DatasetError, load_split, model_shape, read_manifest
from pipelines.worker import step_noise_seed


@dataclass(frozen=True)
class PreparedSetup:
    """The prepared train split (uint8 (N, S, S, C) and labels), held-out images, the data's shape, featurenet."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    shape: dict[str, int]
    classifier: Classifier
    eval_seed: int  # train.health.seed: the latents the workers evaluate

    @classmethod
    def load(cls, params: Params) -> PreparedSetup:
        try:
            train_images, train_labels = load_split(PREPARED_DIR, "train")
            test_images, _ = load_split(PREPARED_DIR, "test", limit=params.featurenet.reference_images)
            shape = model_shape(read_manifest(PREPARED_DIR))
            classifier = load_featurenet()
        except (ArtifactError, DatasetError) as error:
            sys.exit(f"{error}\nThe benchmarks score in the pipeline's own data and feature space: "
                     f"run `dvc repro featurenet` first ({PREPARED_DIR}, {FEATURENET_FILE}).")
        return cls(train_images, train_labels, test_images, shape, classifier, params.train.health.seed)

    def features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return extract(self.classifier, images)

    def test_features(self, count: int, seed: int) -> np.ndarray:
        """Featurenet features of `count` held-out digits drawn with `seed`."""
        pick = np.random.default_rng(seed).choice(len(self.test_images), min(count, len(self.test_images)),
                                                  replace=False)
        return self.features(from_uint8(self.test_images[pick]))[0]

    def sample_fid(self, generator: torch.nn.Module, count: int, reference: np.ndarray) -> float:
        """Domain-FID of `count` samples (the workers' evaluation latents) against `reference` features."""
        fakes = generate_images(generator, count, generator.latent_dim, self.eval_seed,
                                num_classes=generator.num_classes)
        return fid(self.features(fakes)[0], reference)


def train_plain(params: Params, optimizer: OptimizerSettings, setup: PreparedSetup, batch_size: int, seed: int,
                steps: int | None = None, seconds: float | None = None,
                on_step: Callable[[int, TrainingState], None] | None = None) -> tuple[TrainingState, int, float]:
    """A plain single-process loop over gancore for `steps` generator updates or `seconds` of training
    (evaluation in `on_step(done, state)` is not counted). Returns the state, the steps done, the seconds."""
    model = params.model
    spec = model.spec(**setup.shape)
    settings = model.step_settings(setup.shape["num_classes"])
    state = TrainingState.create(spec, optimizer, params.train.ema_decay, seed)
    images, labels = from_uint8(setup.train_images), torch.from_numpy(setup.train_labels)
    noise, done, elapsed = torch.Generator(), 0, 0.0
    per_step = batch_size * settings.critic_steps
    while (steps is None or done < steps) and (seconds is None or elapsed < seconds):
        started = time.perf_counter()
        noise.manual_seed(step_noise_seed(seed, done, 0))
        index = torch.randint(len(images), (per_step,), generator=noise)
        state.iteration(images[index], labels[index] if settings.num_classes else None, settings, noise)
        elapsed += time.perf_counter() - started
        done += 1
        if on_step is not None:
            on_step(done, state)
    return state, done, elapsed
