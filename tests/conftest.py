"""Shared fixtures: real components on loopback, started once per test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.sample_data import seed
from pipelines.stack import endpoint_url, ensure_bucket, start_s3_server, stop
from pipelines.storage import s3_client


# Ray Train's preemption watcher polls for node drains (spot reclaims), which loopback clusters never see;
# without it each training run starts one actor process fewer on these 2 cores.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Distinctive, so a test can search every log and output for it: it must never be written anywhere.
SECRET_ACCESS_KEY = "gan-test-secret-7Qv2Xk9pLm"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (for "endpoint unreachable" tests)."""
    return free_port()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with the AWS_* environment pointing at it."""
    port = free_port()
    url = endpoint_url(port)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", url)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        s3_client.cache_clear()
        process = start_s3_server(port, log_path=tmp_path_factory.mktemp("moto") / "s3.log")
        try:
            yield url
        finally:
            stop(process)
            s3_client.cache_clear()


@pytest.fixture(scope="session")
def seeded_bucket(s3_endpoint: str) -> str:
    """s3://gan-test-data/mnist holding 600 class-balanced MNIST PNGs."""
    ensure_bucket("gan-test-data")
    seed("mnist", "gan-test-data", "mnist", limit=600)
    return "s3://gan-test-data/mnist"


REPO = Path(__file__).resolve().parents[1]

# Small enough that the whole pipeline runs in a couple of minutes on 2 cores.
TINY_OVERRIDES = {
    "data": {"image_size": 16, "shard_size": 256, "download_workers": 8},
    "featurenet": {"epochs": 2, "encoder_steps": 14, "batch_size": 64},
    "model": {"latent_dim": 16, "base_channels": 8},
    "train": {"num_workers": 2, "batch_size": 16, "steps": 24, "log_every": 8, "checkpoint_every": 8,
              # A tiny model's samples are poor by design: check them, but never stop the run for it.
              "health": {"max_grad_norm": 1e4, "check_every": 8, "warmup_steps": 0, "samples": 64,
                         "min_class_coverage": 0.0, "min_diversity": 0.0, "min_conditional_accuracy": 0.0,
                         "seed": 12345}},
    "tune": {"num_samples": 2, "steps": 16, "report_every": 8, "eval_samples": 64},
    "register": {"max_fid_ratio": 1e6},  # a 24-step model is far from real data; the gate's floor is tested apart
    "eval": {"num_samples": 64, "kid_subset_size": 32, "kid_subsets": 10, "bootstrap_resamples": 5, "grid_size": 16,
             "is_splits": 2},
}


def tiny_params(**sections: dict) -> dict:
    """The repository's params.yaml with TINY_OVERRIDES and then `sections` applied, as a raw dict."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for overrides in (TINY_OVERRIDES, sections):
        for section, values in overrides.items():
            raw[section].update(values)
    return raw


SHAPE_KINDS = 4


def shapes(count: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images of four kinds (square, disc, horizontal and vertical bar) in random colours and places
    on random dark backgrounds, and their kinds."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    images = np.empty((count, size, size, 3), np.uint8)
    kinds = rng.integers(0, SHAPE_KINDS, count)
    for image, kind in zip(images, kinds):
        image[:] = rng.integers(0, 60, 3)
        r, c = rng.integers(4, size - 4, 2)
        mask = [(abs(rows - r) < 3) & (abs(cols - c) < 3), (rows - r) ** 2 + (cols - c) ** 2 < 10,
                abs(rows - r) < 2, abs(cols - c) < 2][kind]
        image[mask] = rng.integers(120, 256, 3)
    return images, kinds.astype(np.int64)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """A real local Ray runtime with the 2 CPUs this machine has.

    Started after the S3 endpoint, as a stage does: workers inherit the AWS_* environment,
    which pyarrow's S3 filesystem (Ray storage on s3://) reads on each worker.
    """
    import ray

    # With the dashboard, as in the stages: Ray Train's placement-group cleanup asks its state API.
    # address "local": a cluster of this test process's own, never a `ray start` head another test left up.
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def mlflow_server_in(folder: Path) -> Iterator[str]:
    """A real MLflow tracking server on loopback, its store and artifacts in `folder`, one worker process (the
    default starts many on this 2-core machine); yields its URL."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not come up") from None
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def start_node(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block` in its own process group, so teardown stops this node and no other Ray on the machine."""
    with log.open("ab") as out:
        return subprocess.Popen(command + ["--block", "--disable-usage-stats"], env=env | {"PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def forget_ray_address(address: str) -> None:
    """Delete the record of the latest `ray start --head` if it names `address`: `ray stop` would delete it, but
    it stops every Ray on the machine, and a stale record would send another test's `ray.init()` there."""
    record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if record.is_file() and record.read_text().strip() == address:
        record.unlink()


def wait_for_log_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} never appeared in {log}:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
