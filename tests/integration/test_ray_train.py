"""Ray Train on a real local Ray runtime: 2 DDP workers, checkpoints in Ray storage, resume.

Checkpoints in S3-compatible storage, and a killed driver, are tested on a two-node cluster in test_multinode.py.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_params
from toy_training import toy_fit

from pipelines.config import parse_params
from pipelines.stages.train import TrainingStopped, completed_state


def test_two_workers_train_checkpoint_and_resume(ray_local, tmp_path):
    raw = tiny_params(train={"steps": 6, "log_every": 2, "checkpoint_every": 2, "storage_path": str(tmp_path)})
    params = parse_params(raw)
    state = completed_state(toy_fit(params, "resume-test"))
    assert state["step"] == 6
    assert [row["step"] for row in state["history"]] == [2, 4, 6]
    assert all(math.isfinite(row["loss_d"]) and math.isfinite(row["loss_g"]) for row in state["history"])
    assert all(row["images_per_second"] > 0 for row in state["history"])
    # Each worker has 1 CPU (Ray sizes its threads to that): it cannot keep much more than one core busy.
    assert all(0 < row["cpu_cores_busy"] < 1.5 and row["peak_rss_mb"] > 100 for row in state["history"])
    evaluated = [row for row in state["history"] if "fid" in row]
    assert [row["step"] for row in evaluated] == [6], "EMA samples are scored at the end of the run"
    assert 0 <= evaluated[0]["class_coverage"] <= 1 and evaluated[0]["diversity"] > 0
    # The toy model is conditional: diversity within each requested class, and accuracy on the labels.
    assert evaluated[0]["class_diversity"] > 0 and 0 <= evaluated[0]["conditional_accuracy"] <= 1
    assert {"generator", "discriminator", "generator_ema", "generator_optimizer", "discriminator_optimizer",
            "torch_rng"} <= set(state)

    # Same run name, longer budget: Ray restores the stored checkpoint and continues from step 6.
    longer = parse_params(tiny_params(train={**raw["train"], "steps": 8}))
    resumed = completed_state(toy_fit(longer, "resume-test"))
    assert [row["step"] for row in resumed["history"]] == [2, 4, 6, 8], "finished work is kept, not redone"
    # An interrupted or repeated `dvc repro` with nothing changed finds the finished run and trains nothing.
    repeated = completed_state(toy_fit(longer, "resume-test"))
    assert repeated["history"] == resumed["history"]
    assert resumed["restores"] == [6], "the longer run was restored from the step-6 checkpoint"
    first_steps = {row["step"]: row["loss_d"] for row in state["history"]}
    assert all(first_steps[row["step"]] == row["loss_d"] for row in resumed["history"][:3])

    # Same run name, shorter budget (`dvc exp run -S train.steps=4` after 8): the stored run is past it, so
    # training starts over and ends at step 4 with the losses the first run had there, a 4-step model.
    shorter = parse_params(tiny_params(train={**raw["train"], "steps": 4}))
    restarted = completed_state(toy_fit(shorter, "resume-test"))
    assert restarted["step"] == 4 and restarted["restores"] == [], "not restored from the step-8 checkpoint"
    assert [(row["step"], row["loss_d"]) for row in restarted["history"]] == [(2, first_steps[2]), (4, first_steps[4])]


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(ray_local, tmp_path):
    """Cut the newest checkpoint short (a node lost mid-upload): the longer run resumes from the previous one
    and redoes the lost interval exactly as the first run did it."""
    raw = tiny_params(train={"steps": 8, "log_every": 4, "checkpoint_every": 4, "checkpoints_kept": 2,
                             "storage_path": str(tmp_path)})
    first = completed_state(toy_fit(parse_params(raw), "cut"))
    newest = sorted((tmp_path / "cut").glob("checkpoint_*/checkpoint.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    longer = parse_params(tiny_params(train={**raw["train"], "steps": 12}))
    resumed = completed_state(toy_fit(longer, "cut"))
    assert resumed["restores"] == [4], "restored from the step-4 checkpoint, the one before the truncated step 8"
    assert [row["step"] for row in resumed["history"]] == [4, 8, 12]
    # Batches and noise are functions of (seed, step): steps 5-8 again give the first run's step-8 losses.
    assert [(row["loss_d"], row["loss_g"]) for row in resumed["history"][:2]] == [
        (row["loss_d"], row["loss_g"]) for row in first["history"]]


@pytest.mark.parametrize("workers", [1, 2])
def test_same_inputs_give_bit_identical_weights(ray_local, tmp_path, workers):
    """Two runs of the same params under different run names (so the second cannot resume the first)."""
    params = parse_params(tiny_params(train={"num_workers": workers, "steps": 8, "log_every": 4,
                                             "checkpoint_every": 8, "storage_path": str(tmp_path)}))
    first, second = (completed_state(toy_fit(params, f"bits-{workers}-{run}")) for run in "ab")
    assert first["history"][-1]["loss_d"] == second["history"][-1]["loss_d"]
    for model in ("generator", "discriminator", "generator_ema"):
        differ = [name for name, tensor in first[model].items() if not torch.equal(tensor, second[model][name])]
        assert not differ, f"{workers} worker(s): the {model}'s {differ} differ between identical runs"


def test_mode_collapse_stops_every_worker_and_nothing_is_exported(ray_local, tmp_path):
    """A coverage floor no generator can meet: both workers stop at the first check, the run is refused."""
    health = tiny_params()["train"]["health"] | {"min_class_coverage": 1.0, "check_every": 4, "warmup_steps": 4}
    params = parse_params(tiny_params(train={"steps": 12, "log_every": 2, "checkpoint_every": 2,
                                             "storage_path": str(tmp_path), "health": health}))
    result = toy_fit(params, "collapse-test")
    assert result.error is None, "an unhealthy run ends cleanly on every worker, not by a crash or a hang"
    assert result.metrics["step"] == 4
    assert "mode collapse" in result.metrics["health_error"].lower()
    with pytest.raises(TrainingStopped, match="(?i)mode collapse") as stopped:
        completed_state(result)
    assert "no model is exported or registered" in str(stopped.value)
    # Re-running the same params does not train into the collapse again: it ends with the same verdict.
    again = toy_fit(params, "collapse-test")
    assert again.metrics["step"] == 4
    with pytest.raises(TrainingStopped, match="(?i)mode collapse"):
        completed_state(again)
    # Relaxing the limit (which does not change the run's identity) continues from the stopped checkpoint.
    relaxed = parse_params(tiny_params(train={**params.train.model_dump(), "health": {**health,
                                                                                     "min_class_coverage": 0.0}}))
    state = completed_state(toy_fit(relaxed, "collapse-test"))
    assert state["step"] == 12 and state["restores"] == [4]
    assert [row["step"] for row in state["history"]] == [2, 4, 6, 8, 10, 12], "the stopping step's report is kept"


def test_exploding_gradients_stop_every_worker_between_reports(ray_local, tmp_path):
    """Steps between reports carry no health vote between workers; the per-step gradient check
    (all-reduced gradients, the same on every worker) still stops both at the same step, without a hang."""
    health = tiny_params()["train"]["health"] | {"max_grad_norm": 1e-9}
    params = parse_params(tiny_params(train={"steps": 12, "log_every": 6, "checkpoint_every": 6,
                                             "storage_path": str(tmp_path), "health": health}))
    result = toy_fit(params, "exploding-test")
    assert result.error is None, "a diverged run ends cleanly on every worker, not by a crash or a hang"
    assert result.metrics["step"] == 1, "stopped at the first step, not at the next report"
    assert "exploding gradients at step 1" in result.metrics["health_error"]
    with pytest.raises(TrainingStopped, match="exploding gradients"):
        completed_state(result)


def latest_checkpoint_step(run_dir: Path) -> int:
    """Highest step among the checkpoints stored so far (files still being written are skipped)."""
    steps = [0]
    for path in run_dir.glob("checkpoint_*/checkpoint.pt"):
        try:
            steps.append(torch.load(path, map_location="cpu", weights_only=True)["step"])
        except Exception:  # noqa: BLE001 - a checkpoint mid-copy; the next poll sees it whole
            continue
    return max(steps)


def test_killed_worker_resumes_from_the_latest_checkpoint(ray_local, tmp_path):
    """SIGKILL one training worker mid-run: Ray Train restarts the group from the latest checkpoint."""
    from ray.util.state import list_actors

    steps, every = 160, 20
    health = tiny_params()["train"]["health"] | {"check_every": 10**6}  # EMA samples scored at the end only
    params = parse_params(tiny_params(train={"steps": steps, "log_every": 10, "checkpoint_every": every,
                                             "max_failures": 2, "storage_path": str(tmp_path), "health": health}))
    killed: dict[str, int] = {}
    problems: list[str] = []

    def kill_a_worker_after_two_checkpoints() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            seen = latest_checkpoint_step(tmp_path / "kill-test")
            if seen >= 2 * every:
                try:
                    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                          detail=True)
                except Exception as error:  # noqa: BLE001 - the state API can time out on a loaded machine; retry
                    problems.append(repr(error))
                    continue
                if workers:
                    os.kill(workers[-1]["pid"], signal.SIGKILL)
                    killed.update(checkpoint_step=seen, pid=workers[-1]["pid"])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_after_two_checkpoints, daemon=True)
    killer.start()
    result = toy_fit(params, "kill-test")
    killer.join(timeout=5)
    assert killed, f"the run finished before a worker could be killed (state API errors: {problems[-3:]})"
    state = completed_state(result)
    assert state["step"] == steps, "the run finished after the failure"
    assert len(state["restores"]) == 1, "exactly one restore, from the failure"
    restored_at = state["restores"][0]
    # A checkpoint still being committed when the worker died does not count; the one before it does.
    assert 0 < restored_at < steps, "resumed from a checkpoint, not from scratch"
    assert killed["checkpoint_step"] - restored_at <= every, "at most one checkpoint interval of work is lost"
    assert [row["step"] for row in state["history"]] == list(range(10, steps + 1, 10)), "no report lost or repeated"
