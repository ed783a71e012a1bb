"""Ray Train on a real local Ray runtime: 2 DDP workers, checkpoints in Ray storage, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray

from conftest import tiny_params
from pipelines.config import parse_params
from pipelines.train import fit
from pipelines.worker import batch_indices, load_checkpoint


def blobs(count: int = 96, size: int = 16) -> np.ndarray:
    """Bright squares at random places: a learnable toy image set."""
    rng = np.random.default_rng(0)
    images = np.zeros((count, size, size, 1), dtype=np.uint8)
    for image in images:
        row, col = rng.integers(0, size - 6, size=2)
        image[row : row + 6, col : col + 6] = 255
    return images


def test_batches_cover_each_epoch_once_and_split_across_workers():
    seen = [batch_indices(96, 8, step, seed=0, rank=rank, world_size=2) for step in range(6) for rank in (0, 1)]
    flat = np.concatenate([batch.numpy() for batch in seen])
    assert sorted(flat) == list(range(96)), "one epoch visits every image exactly once across both workers"
    assert not np.array_equal(batch_indices(96, 8, 6, 0, 0, 2), batch_indices(96, 8, 0, 0, 0, 2)), "new epoch, new order"
    with pytest.raises(ValueError, match="train.batch_size"):
        batch_indices(10, 8, 0, seed=0, rank=0, world_size=2)


def test_two_workers_train_checkpoint_and_resume(ray_local, tmp_path):
    raw = tiny_params(train={"steps": 6, "log_every": 2, "checkpoint_every": 2, "storage_path": str(tmp_path)})
    params = parse_params(raw)
    images_ref = ray.put(blobs())
    optimizer = params.train.optimizer()

    result = fit(params, images_ref, optimizer, name="resume-test")
    assert result.error is None
    state = load_checkpoint(result.checkpoint)
    assert state["step"] == 6
    assert [row["step"] for row in state["history"]] == [2, 4, 6]
    assert all(math.isfinite(row["loss_d"]) and math.isfinite(row["loss_g"]) for row in state["history"])
    assert all(row["images_per_second"] > 0 for row in state["history"])
    assert {"generator", "discriminator", "generator_ema", "generator_optimizer", "discriminator_optimizer",
            "torch_rng"} <= set(state)

    # Same run name, longer budget: Ray restores the stored checkpoint and continues from step 6.
    longer = parse_params(tiny_params(train={**raw["train"], "steps": 8}))
    resumed = load_checkpoint(fit(longer, images_ref, optimizer, name="resume-test").checkpoint)
    assert [row["step"] for row in resumed["history"]] == [2, 4, 6, 8], "finished work is kept, not redone"
    # An interrupted or repeated `dvc repro` with nothing changed finds the finished run and trains nothing.
    repeated = load_checkpoint(fit(longer, images_ref, optimizer, name="resume-test").checkpoint)
    assert repeated["history"] == resumed["history"]
    first_steps = {row["step"]: row["loss_d"] for row in state["history"]}
    assert all(first_steps[row["step"]] == row["loss_d"] for row in resumed["history"][:3])


def test_checkpoints_go_to_s3_compatible_storage(ray_local, s3_endpoint, tmp_path):
    """train.storage_path: s3://… reaches the loopback server (pyarrow needs the endpoint passed explicitly)."""
    from pipelines.stack import ensure_bucket
    from pipelines.storage import list_objects

    ensure_bucket("gan-ray")
    params = parse_params(tiny_params(train={"steps": 2, "log_every": 2, "checkpoint_every": 2,
                                             "storage_path": "s3://gan-ray/runs"}))
    result = fit(params, ray.put(blobs()), params.train.optimizer(), name="s3-test")
    assert load_checkpoint(result.checkpoint)["step"] == 2
    stored = [item.key for item in list_objects("s3://gan-ray/runs/s3-test")]
    assert any(key.endswith("checkpoint.pt") for key in stored), stored
