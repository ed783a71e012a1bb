"""MLflow registration against a real tracking store: lineage, idempotence, the champion gate, sampling."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import free_port, tiny_params
from mlflow import MlflowClient
from PIL import Image

from gancore.models import ModelSpec, build_gan
from pipelines import register

LATENT_DIM, IMAGE_SIZE = 16, 16


def write_workspace(root: Path, fid: float, seed: int, num_classes: int = 0) -> None:
    """The files register reads, as train and evaluate would leave them."""
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "manifest.json").write_text(json.dumps({"dataset_hash": "d" * 64}))
    model_dir = root / "models" / "gan"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    spec = ModelSpec("dcgan", LATENT_DIM, 1, IMAGE_SIZE, 8, num_classes=num_classes)
    generator, discriminator = build_gan(spec)
    torch.save(generator.state_dict(), model_dir / "generator_ema.pt")
    torch.save(discriminator.state_dict(), model_dir / "discriminator.pt")
    (model_dir / "config.json").write_text(json.dumps({
        "model": asdict(spec), "latent_dim": LATENT_DIM, "num_classes": num_classes,
        "steps": 10, "ray_run_name": f"train-{seed}", "ray_job_id": "01000000", "ray_submission_id": "",
        "optimizer": {"lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5, "beta2": 0.999},
    }))
    evaluation = root / "results" / "eval"
    evaluation.mkdir(parents=True, exist_ok=True)
    scores = {"fid": {"value": fid}, "kid": {"value": fid / 100}, "inception_score": {"value": 5.0},
              "conditional_accuracy": {"value": 0.9, "ci95_low": 0.85, "ci95_high": 0.95, "n": 64}}
    (evaluation / "metrics.json").write_text(json.dumps({**scores, "real_vs_real": scores, "n": 64}))
    for picture in ("samples.png", "curves.png"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(evaluation / picture)
    history = root / "results" / "train" / "history.csv"
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text("step,loss_d,loss_g\n10,1.0,1.0\n")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def aliases(name: str) -> dict[str, str]:
    model = register.configure_mlflow().get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def versions(name: str) -> list[str]:
    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def test_register_gates_champion_and_is_idempotent(workspace):
    name = tiny_params()["register"]["model_name"]

    write_workspace(workspace, fid=50.0, seed=1)
    register.main()
    assert aliases(name) == {"challenger": "1", "champion": "1"}, "the first model becomes champion"
    recorded = json.loads((workspace / "results/register/model_version.json").read_text())
    assert recorded["version"] == 1 and recorded["champion"] is True

    register.main()
    assert versions(name) == ["1"], "unchanged inputs must not create a duplicate version"

    write_workspace(workspace, fid=80.0, seed=2)
    register.main()
    assert aliases(name) == {"challenger": "2", "champion": "1"}, "a worse model must not become champion"

    write_workspace(workspace, fid=20.0, seed=3)
    register.main()
    assert aliases(name) == {"challenger": "3", "champion": "3"}, "a better model takes the champion alias"

    client = MlflowClient()
    run = client.get_run(client.get_model_version(name, "3").run_id)
    assert run.data.metrics["fid"] == 20.0
    assert [run.data.metrics[f"conditional_accuracy{part}"] for part in ("", "_ci95_low", "_ci95_high")] == [
        0.9, 0.85, 0.95], "each metric is logged with its interval"
    assert run.data.tags["dataset_hash"] == "d" * 64
    assert run.data.tags["ray_run_name"] == "train-3" and run.data.tags["ray_job_id"] == "01000000"
    assert run.data.tags["git_commit"]
    assert run.data.params["model.family"] == "dcgan"
    assert {"samples.png", "metrics.json", "manifest.json", "config.json"} <= {
        Path(a.path).name for a in client.list_artifacts(run.info.run_id)}


def test_cli_promote_and_generate(workspace):
    name = tiny_params()["register"]["model_name"]
    write_workspace(workspace, fid=50.0, seed=1)
    register.main()
    write_workspace(workspace, fid=90.0, seed=2)
    register.main()

    def gan(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                              timeout=300)

    refused = gan("promote", "2")
    assert refused.returncode == 1 and "does not beat" in refused.stdout
    assert aliases(name)["champion"] == "1"
    forced = gan("promote", "2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert aliases(name)["champion"] == "2"

    made = gan("generate", "--model", f"models:/{name}@champion", "--n", "16", "--out", "grid.png")
    assert made.returncode == 0, made.stderr
    grid = Image.open(workspace / "grid.png")
    # 4x4 tiles of 16 px with 2 px padding, scaled 3x for viewing.
    assert grid.size == (3 * (4 * (IMAGE_SIZE + 2) + 2),) * 2
    assert np.asarray(grid).std() > 0, "the grid holds generated pixels, not a blank image"


def test_conditional_generator_serves_as_one_array_through_pyfunc(workspace):
    """MLflow pyfunc takes one array: latents with the class id as the last column."""
    import mlflow.pyfunc

    name = tiny_params()["register"]["model_name"]
    write_workspace(workspace, fid=50.0, seed=1, num_classes=3)
    register.main()
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    latents = np.random.default_rng(0).standard_normal((2, LATENT_DIM)).astype(np.float32)
    as_class = [served.predict(np.hstack([latents, np.full((2, 1), label, np.float32)])) for label in (0, 2)]
    assert as_class[0].shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(as_class[0]).max() <= 1.0
    assert not np.allclose(as_class[0], as_class[1]), "the class column changes what is generated"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on loopback, one worker process (the default starts many)."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
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
        yield url, tmp_path / "server-artifacts"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_register_through_a_tracking_server(workspace, mlflow_server, monkeypatch):
    url, artifact_root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    write_workspace(workspace, fid=50.0, seed=1)
    register.main()
    name = tiny_params()["register"]["model_name"]
    assert aliases(name) == {"challenger": "1", "champion": "1"}
    assert not (workspace / "mlflow.db").exists(), "with a server configured nothing is tracked locally"
    assert any(path.name == "samples.png" for path in artifact_root.rglob("*")), "artifacts reach the server"
    recorded = json.loads((workspace / "results/register/model_version.json").read_text())
    assert recorded["tracking_uri"] == url
