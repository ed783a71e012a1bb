"""Stage artifacts load as tensors and plain containers only; what they cannot hold is refused with a message."""

import os

import numpy as np
import pytest
import ray.train
import torch
import yaml
from ray.train.v2.api.exceptions import WorkerGroupError

from conftest import tiny_params
from gancore.metrics.features import reference_statistics
from gancore.models.classifier import Classifier
from pipelines.artifacts import ArtifactError, load_featurenet, load_reference, save_featurenet
from pipelines.config import ConfigError, parse_params
from pipelines.stages.train import tuned_optimizer, worker_errors
from pipelines.worker import CHECKPOINT_FILE, load_checkpoint


class Planted:
    """Unpickling this object creates a folder: the proof that unpickling ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_featurenet_round_trips_and_a_planted_pickle_is_refused_unexecuted(tmp_path):
    torch.manual_seed(0)
    classifier = Classifier(1, 16, num_classes=3, feature_dim=8)
    features = np.random.default_rng(0).normal(size=(40, 8))
    stats = reference_statistics(features, np.arange(40) % 3, keep=10)
    save_featurenet(classifier, 0.5, stats, tmp_path / "featurenet.pt")
    loaded = load_featurenet(tmp_path / "featurenet.pt")
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), loaded.state_dict().values()))
    reference = load_reference(tmp_path / "featurenet.pt")
    assert set(reference) == {"classifier", "mu", "sigma", "centroids", "features", "modes", "classes"}
    np.testing.assert_array_equal(reference["mu"], features.mean(axis=0))  # the held-out statistics, not recomputed
    assert reference["features"].shape == (10, 8) and reference["classes"].dtype == np.int64

    marker = tmp_path / "ran"
    torch.save({"state_dict": Planted(marker), "hyper": {}}, tmp_path / "planted.pt")
    with pytest.raises(ArtifactError, match="not loaded"):
        load_featurenet(tmp_path / "planted.pt")
    assert not marker.exists(), "the planted object was never unpickled"


def test_a_planted_checkpoint_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"step": 8, "generator": Planted(marker)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ArtifactError, match="training checkpoint"):
        load_checkpoint(ray.train.Checkpoint.from_directory(str(tmp_path)))
    assert not marker.exists()


@pytest.mark.parametrize("content", ["", "[]\n", "lr_g: 0.001\nsteps: 3\n"])
def test_a_malformed_tune_output_is_an_error_not_a_silent_fallback(tmp_path, content):
    best = tmp_path / "best_params.yaml"
    best.write_text(content)
    with pytest.raises(ConfigError, match="dvc repro -f tune"):
        tuned_optimizer(parse_params(tiny_params()), best)
    best.write_text(yaml.safe_dump({"lr_g": 0.001}))
    assert tuned_optimizer(parse_params(tiny_params()), best)["lr_g"] == 0.001


def test_a_failed_run_reports_each_workers_own_error():
    error = WorkerGroupError("Training failed", {1: RuntimeError("Traceback (most recent call last):\n  ...\n"
                                                                  "ValueError: shard 3 is truncated"),
                                                 0: RuntimeError("OSError: disk full")})
    assert worker_errors(error) == "worker 0: OSError: disk full; worker 1: ValueError: shard 3 is truncated"
