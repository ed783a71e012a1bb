"""A training that fails or is stopped as unhealthy stays visible in MLflow: FAILED, with the reason."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_params
from mlflow import MlflowClient

from pipelines.stages import train
from pipelines.stages.train import TrainingStopped


def test_a_stopped_training_ends_failed_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(train={"use_tuned": False})))
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    manifest = {"dataset_hash": "d" * 64, "image_size": 16, "channels": 1, "class_names": ["a", "b"],
                "counts": {"train": 96, "test": 24, "rejected": 0}}
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "featurenet.pt").write_bytes(b"featurenet")
    reason = "training stopped as unhealthy: class coverage 0.05 below 0.3 at step 500"

    def stopped(*args, **kwargs):  # the Ray run itself is tested in test_ray_train.py
        raise TrainingStopped(reason)

    monkeypatch.setattr(train, "train", stopped)
    with pytest.raises(TrainingStopped):
        train.main()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tiny_params()["register"]["experiment"]).experiment_id
    runs = {run.data.tags["stage"]: run for run in client.search_runs([experiment])}
    assert set(runs) == {"pipeline", "train"}
    for run in runs.values():
        assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == reason
    assert runs["train"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    assert runs["train"].data.params["train.use_tuned"] == "False", "what was tried is recorded"
    (dataset,) = runs["train"].inputs.dataset_inputs
    assert {tag.key: tag.value for tag in dataset.tags}["dataset_hash"] == "d" * 64
