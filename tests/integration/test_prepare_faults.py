"""Stage prepare on flaky storage (a fault-injecting proxy in front of the loopback S3 server) and when killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from fault_proxy import FaultProxy
from conftest import REPO
from synthetic import REPO_PARAMS, data_params, encode, noise, npz, tar_shard, upload

from pipelines.dataset import load_split, read_manifest
from pipelines.stages.prepare import prepare
from pipelines.stack import ensure_bucket
from pipelines.storage import s3_client

SOURCE = "s3://gan-test-data/flaky"


@pytest.fixture(scope="module")
def flaky_source(s3_endpoint: str) -> str:
    ensure_bucket("gan-test-data")
    files = {f"{'xyz'[seed % 3]}/{seed:03d}.png": encode(noise(seed)) for seed in range(40)}
    files["x/shard.tar"] = tar_shard({f"{seed}.png": encode(noise(seed)) for seed in range(40, 46)})
    files["y/rows.npz"] = npz(images=noise(46, (5, 20, 20)))
    upload(SOURCE, files)
    return SOURCE


def test_throttling_5xx_and_dropped_connections_are_retried_to_the_same_manifest(
    flaky_source: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = prepare(data_params(flaky_source), tmp_path / "clean", tmp_path / "clean.json")

    with closing(FaultProxy(s3_endpoint, period=10)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3_client.cache_clear()
        try:
            flaky = prepare(data_params(flaky_source), tmp_path / "flaky", tmp_path / "flaky.json")
        finally:
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
            s3_client.cache_clear()

    assert set(proxy.faults) == {"slow_down", "dropped", "cut_body"} and proxy.requests >= 42 + proxy.faults.total()
    assert flaky == clean and clean["counts"]["rejected"] == 0
    for shard in clean["shards"]:
        assert (tmp_path / "flaky" / shard["file"]).read_bytes() == (tmp_path / "clean" / shard["file"]).read_bytes()


def run_prepare(workdir: Path, source: str) -> subprocess.Popen:
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["data"] |= {"source": source, "image_size": 16, "shard_size": 64, "download_workers": 4}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipelines.stages.prepare"], cwd=workdir, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_prepare_leaves_the_previous_outputs_whole(
    flaky_source: str, seeded_bucket: str, tmp_path: Path
) -> None:
    out_dir, report = tmp_path / "data" / "prepared", tmp_path / "reports" / "data.json"
    previous = prepare(data_params(flaky_source), out_dir, report)

    interrupted = run_prepare(tmp_path, seeded_bucket)  # 600 objects: seconds of downloads to interrupt
    deadline = time.monotonic() + 60
    while not any(spill.stat().st_size for spill in (tmp_path / "data").glob(".prepared.tmp-*/.pixels")):
        assert interrupted.poll() is None and time.monotonic() < deadline, "prepare ended before it was killed"
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()

    assert read_manifest(out_dir) == previous
    images, _ = load_split(out_dir, "train")  # every shard still matches its sha256
    assert len(images) == previous["counts"]["train"]
    assert [path.name for path in (tmp_path / "data").iterdir() if not path.name.startswith(".")] == ["prepared"]

    assert prepare(data_params(flaky_source), out_dir, report) == previous
    assert [path.name for path in (tmp_path / "data").iterdir()] == ["prepared"], "the next run clears the leftovers"
