"""MLflow registration against a real tracking store: lineage, idempotence, the champion gate, sampling."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SECRET_ACCESS_KEY, free_port, mlflow_server_in, tiny_params
from mlflow import MlflowClient
from PIL import Image

from gancore.models import ModelSpec, build_gan
from pipelines.stages import register
from pipelines.errors import UserError
from pipelines.promotion import history

LATENT_DIM, IMAGE_SIZE = 16, 16


def write_workspace(root: Path, fid: float, seed: int, num_classes: int = 0, interval: float = 0.0,
                    real_fid: float = 1.0, health: str = "passed", featurenet: bytes = b"featurenet", n: int = 64,
                    register_params: dict | None = None) -> None:
    """The files register reads, as train and evaluate would leave them: FID `fid` with a 95% interval of
    +-`interval`, real-vs-real `real_fid`, the training's health verdict and the featurenet file's bytes."""
    params = tiny_params(register={"max_fid_ratio": 100.0, **(register_params or {})})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "models").mkdir(exist_ok=True)
    (root / "models" / "featurenet.pt").write_bytes(featurenet)
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
        "optimizer": {"lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5, "beta2": 0.999}, "health": health,
    }))
    evaluation = root / "results" / "eval"
    evaluation.mkdir(parents=True, exist_ok=True)
    scores = {"fid": {"value": fid, "ci95_low": fid - interval, "ci95_high": fid + interval},
              "kid": {"value": fid / 100}, "inception_score": {"value": 5.0},
              "conditional_accuracy": {"value": 0.9, "ci95_low": 0.85, "ci95_high": 0.95, "n": 64}}
    real = {**scores, "fid": {"value": real_fid}}
    (evaluation / "metrics.json").write_text(json.dumps({**scores, "real_vs_real": real, "n": n}))
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
    with mlflow_server_in(tmp_path) as url:
        yield url, tmp_path / "server-artifacts"


def test_register_through_a_tracking_server(workspace, mlflow_server, monkeypatch):
    """With a password in the tracking URI (basic auth): it is used, and written nowhere."""
    url, artifact_root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("http://", f"http://ci:{SECRET_ACCESS_KEY}@"))
    write_workspace(workspace, fid=50.0, seed=1)
    register.main()
    name = tiny_params()["register"]["model_name"]
    assert aliases(name) == {"challenger": "1", "champion": "1"}
    assert not (workspace / "mlflow.db").exists(), "with a server configured nothing is tracked locally"
    assert any(path.name == "samples.png" for path in artifact_root.rglob("*")), "artifacts reach the server"
    recorded = json.loads((workspace / "results/register/model_version.json").read_text())
    assert recorded["tracking_uri"] == url, "the URI is recorded without its credentials"
    written = [path for path in workspace.rglob("*")
               if path.is_file() and SECRET_ACCESS_KEY.encode() in path.read_bytes()]
    assert not written, f"the password was written to {written}"


def champion_after(workspace: Path, name: str, **challenger) -> dict[str, str]:
    """Register a champion (FID 50, no interval), then a challenger (`challenger` keywords of write_workspace);
    the aliases after both."""
    write_workspace(workspace, fid=50.0, seed=1)
    register.main()
    write_workspace(workspace, seed=2, **challenger)
    register.main()
    return aliases(name)


@pytest.mark.parametrize(("interval", "margin", "promoted"), [
    (4.9, 0.0, True),   # interval [40.1, 49.9]: entirely below the champion's 50
    (5.0, 0.0, False),  # interval reaches 50: not beyond noise
    (0.0, 5.0, True),   # improves by exactly the declared margin
    (0.0, 5.5, False),  # by less than it
])
def test_a_challenger_must_beat_the_champion_beyond_noise(workspace, interval, margin, promoted):
    name = tiny_params()["register"]["model_name"]
    after = champion_after(workspace, name, fid=45.0, interval=interval,
                           register_params={"min_improvement": margin})
    assert after == {"challenger": "2", "champion": "2" if promoted else "1"}


@pytest.mark.parametrize("changed", [{"featurenet": b"another feature space"}, {"n": 128}])
def test_scores_from_another_feature_space_or_n_are_not_compared(workspace, changed, capsys):
    name = tiny_params()["register"]["model_name"]
    assert champion_after(workspace, name, fid=5.0, **changed)["champion"] == "1", "a far better FID, elsewhere"
    assert "not comparable with version 1" in capsys.readouterr().out
    forced = subprocess.run([sys.executable, "-m", "pipelines.cli", "promote", "2", "--force"], capture_output=True,
                            text=True, timeout=300)
    assert forced.returncode == 0 and aliases(name)["champion"] == "2", "--force is the explicit way past it"


@pytest.mark.parametrize("floor", [{"health": "failed"}, {"fid": 150.0, "real_fid": 1.0}])
def test_an_unhealthy_or_poor_model_is_a_version_never_the_champion(workspace, floor):
    name = tiny_params()["register"]["model_name"]
    write_workspace(workspace, seed=1, **{"fid": 50.0, **floor})
    register.main()
    assert aliases(name) == {"challenger": "1"}, "registered, but not even a first champion"
    assert json.loads((workspace / "results/register/model_version.json").read_text())["champion"] is False


def test_every_move_is_recorded_and_rollback_restores_the_previous_champion(workspace):
    name = tiny_params()["register"]["model_name"]
    champion_after(workspace, name, fid=20.0)

    def gan(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "champion -> version 1 (rolled back from version 2)" in gan("rollback")
    assert aliases(name)["champion"] == "1"
    moves = history(MlflowClient(), name)
    assert [(move["alias"], move["previous"], move["version"]) for move in moves] == [
        ("champion", None, "1"), ("champion", "1", "2"), ("champion", "2", "1")]
    assert [move["reason"] for move in moves] == ["register", "register", "rollback of version 2"]
    assert all(move["by"] and move["time"].endswith("Z") for move in moves)
    printed = gan("history").splitlines()
    assert len(printed) == 3 and "champion: version 2 -> version 1  (rollback of version 2;" in printed[-1]


def test_parallel_registrations_end_with_the_best_champion_and_one_version_per_lineage(tmp_path, mlflow_server):
    """Five `register` processes at once against one server: four models, one of them twice."""
    url, _ = mlflow_server
    fids = {"a": 80.0, "b": 60.0, "c": 20.0, "c-again": 20.0, "d": 40.0}
    seeds = {"a": 1, "b": 2, "c": 3, "c-again": 3, "d": 4}
    processes = []
    for label, fid in fids.items():
        root = tmp_path / label
        root.mkdir()
        write_workspace(root, fid=fid, seed=seeds[label], interval=1.0)
        processes.append(subprocess.Popen([sys.executable, "-m", "pipelines.stages.register"], cwd=root,
                                          env={**os.environ, "MLFLOW_TRACKING_URI": url},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert all(process.returncode == 0 for process in processes), "\n".join(outputs)[-4000:]
    client = MlflowClient(url)
    name = tiny_params()["register"]["model_name"]
    registered = client.search_model_versions(f"name = '{name}'")
    keys = [version.tags["lineage_key"] for version in registered]
    assert len(keys) == len(set(keys)) == 4, "one version per lineage, though c was registered twice at once"
    champion = client.get_model_version_by_alias(name, "champion")
    assert client.get_run(champion.run_id).data.metrics["fid"] == 20.0, "the best model is champion"
    assert not [model for model in client.search_registered_models() if model.name.endswith("--promotion-lock")]


class FailAfterCreate(http.server.BaseHTTPRequestHandler):
    """A proxy to the tracking server that answers the first model-version creation with a 502 after the
    server has done it: the reply was lost, the work was not."""

    upstream = ""
    failed = []

    def do_GET(self):
        self.forward()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        request = urllib.request.Request(self.upstream + self.path, data=body or None, method=self.command,
                                         headers={"Content-Type": self.headers.get("Content-Type", "")})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                status, payload = reply.status, reply.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        if self.path.endswith("/model-versions/create") and not self.failed:
            self.failed.append(self.path)
            status, payload = 502, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "bad gateway"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_a_server_failing_after_creating_a_version_gets_no_duplicate(workspace, mlflow_server, monkeypatch):
    url, _ = mlflow_server
    FailAfterCreate.upstream, FailAfterCreate.failed = url, []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailAfterCreate)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.server_address[1]}")
        write_workspace(workspace, fid=50.0, seed=1)
        register.main()
    finally:
        proxy.shutdown()
    assert FailAfterCreate.failed, "the proxy did fail a creation"
    name = tiny_params()["register"]["model_name"]
    assert [v.version for v in MlflowClient(url).search_model_versions(f"name = '{name}'")] == ["1"]


def test_the_champion_is_served_over_http(workspace):
    """`mlflow models serve` on loopback: latents and a class column in, images out."""
    name = tiny_params()["register"]["model_name"]
    write_workspace(workspace, fid=50.0, seed=1, num_classes=3)
    register.main()
    port, log = free_port(), (workspace / "serve.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               f"models:/{name}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                               str(port), "--workers", "1"],
                              env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
                                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},  # its uvicorn
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        latents = np.random.default_rng(0).standard_normal((2, LATENT_DIM))
        rows = np.hstack([latents, [[0], [2]]]).tolist()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"inputs": rows}).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    images = np.asarray(json.loads(reply.read())["predictions"])
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (workspace / "serve.log").read_text()
                time.sleep(2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert images.shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE) and np.abs(images).max() <= 1.0
    assert not np.allclose(images[0], images[1])


def test_an_unreachable_tracking_server_stops_register_before_anything_is_logged(workspace, unused_port, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{unused_port}")
    write_workspace(workspace, fid=50.0, seed=1)
    with pytest.raises(UserError, match=f"tracking server at http://127.0.0.1:{unused_port} does not answer"):
        register.main()
    assert not (workspace / "results/register/model_version.json").exists()
