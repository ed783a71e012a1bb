"""`dvc repro prepare` in a fresh git repository against the loopback S3 server: the bucket is a DVC
external dependency, prepared shards round-trip through the S3 remote, and the secret key never leaks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SECRET_ACCESS_KEY
from synthetic import REPO_PARAMS, encode, noise, upload

from pipelines.stack import ensure_bucket

SOURCE = "s3://gan-test-data/dvc-source"
REMOTE = "s3://gan-dvc/prepare-test"


def run(command: list[str], cwd: Path) -> str:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    finished = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
                              check=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def project_copy(destination: Path) -> Path:
    """The files `dvc repro prepare` needs, committed in a new git repository."""
    for folder in ("pipelines", "gancore", ".dvc"):
        shutil.copytree(REPO / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, destination / name)
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["data"] |= {"source": SOURCE, "image_size": 16, "download_workers": 4, "shard_size": 8}
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "remote", "modify", "storage", "url", REMOTE], destination)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=destination, check=True)
    return destination


@pytest.fixture(scope="module")
def dvc_project(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    ensure_bucket("gan-test-data")
    ensure_bucket("gan-dvc")
    upload(SOURCE, {f"{'ab'[seed % 2]}/{seed}.png": encode(noise(seed)) for seed in range(12)})
    project = project_copy(tmp_path_factory.mktemp("dvc-project"))
    return project, [run(["dvc", "repro", "--verbose", "prepare"], project)]


def test_repro_skips_an_unchanged_bucket_and_reruns_a_changed_one(dvc_project: tuple[Path, list[str]]) -> None:
    project, logs = dvc_project
    first = json.loads((project / "data/prepared/manifest.json").read_text())
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    bucket_dependency = {dep["path"]: dep for dep in lock["stages"]["prepare"]["deps"]}[SOURCE]
    assert bucket_dependency["nfiles"] == 12, "the bucket is an external dependency, hashed from its listing"

    logs.append(run(["dvc", "repro", "prepare"], project))
    assert "didn't change, skipping" in logs[-1] and "Running stage" not in logs[-1]

    upload(SOURCE, {"a/0.png": encode(noise(100))})
    logs.append(run(["dvc", "status", "prepare"], project))
    assert f"modified:           {SOURCE}" in logs[-1]
    logs.append(run(["dvc", "repro", "prepare"], project))
    assert "Running stage 'prepare'" in logs[-1]
    second = json.loads((project / "data/prepared/manifest.json").read_text())
    etags = {item["key"]: item["etag"] for item in second["objects"]}
    assert etags["a/0.png"] != {item["key"]: item["etag"] for item in first["objects"]}["a/0.png"]
    assert second["dataset_hash"] != first["dataset_hash"]


def test_fresh_clone_pulls_the_prepared_shards_from_the_s3_remote(
    dvc_project: tuple[Path, list[str]], tmp_path: Path
) -> None:
    project, logs = dvc_project
    logs.append(run(["dvc", "push", "prepare"], project))
    run(["git", "add", "dvc.lock"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "lock"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)

    logs.append(run(["dvc", "pull", "prepare"], clone))

    prepared = sorted(path.name for path in (project / "data/prepared").iterdir())
    assert sorted(path.name for path in (clone / "data/prepared").iterdir()) == prepared
    for name in prepared:
        assert (clone / "data/prepared" / name).read_bytes() == (project / "data/prepared" / name).read_bytes()


def test_the_secret_key_appears_in_no_log_output_or_dvc_file(dvc_project: tuple[Path, list[str]]) -> None:
    project, logs = dvc_project
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_ACCESS_KEY, "dvc and prepare signed their requests with it"

    assert any("prepare: 9 train + 3 test images" in log for log in logs), "the stage's own output is in the logs"
    assert all(SECRET_ACCESS_KEY not in log for log in logs)
    files = [path for path in project.rglob("*") if path.is_file()]
    assert {"dvc.lock", "manifest.json", "data.json", "config"} <= {path.name for path in files}
    assert not [path for path in files if SECRET_ACCESS_KEY.encode() in path.read_bytes()]
