"""The whole pipeline as a user runs it: `dvc repro` in a fresh copy of the repository, then on a
Ray cluster through `ray job submit`, against the loopback S3 server and a real MLflow store."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from conftest import (REPO, SECRET_ACCESS_KEY, forget_ray_address, free_port, mlflow_server_in, start_node, stop_node,
                      tiny_params, wait_for_log_line)
from pipelines.cli import UPLOAD_DEFAULT_EXCLUDES
from pipelines.sample_data import seed
from pipelines.stack import ensure_bucket
from pipelines.storage import list_objects

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
STAGES = ("prepare", "featurenet", "tune", "train", "evaluate", "register")


def run(command: list[str], cwd: Path, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: stages start their own Ray rather than joining a `ray start` head of another test.
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": "local", **env}
    finished = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, f"{' '.join(command)} failed:\n{finished.stdout[-4000:]}\n{finished.stderr[-4000:]}"
    return finished


def copy_repository(destination: Path, params: dict) -> Path:
    """What a fresh clone holds (tracked and new, unignored files), committed in its own git repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    (destination / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    commit(destination, "copy")
    return destination


def commit(repo: Path, message: str) -> None:
    """Commit everything git does not ignore: code, dvc.lock, and the metrics, plots and reports."""
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", message],
                   cwd=repo, check=True)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow server that every stage of this module's runs logs to."""
    with mlflow_server_in(tmp_path_factory.mktemp("mlflow")) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", url)
        yield url


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, seeded_bucket, tracking_server):
    ensure_bucket("gan-dvc")
    repo = copy_repository(tmp_path_factory.mktemp("e2e"), tiny_params(data={"source": seeded_bucket}))
    first = run(["dvc", "repro"], repo)
    return repo, first.stdout + first.stderr


def test_dvc_repro_produces_every_output(pipeline_run):
    repo, log = pipeline_run
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["counts"]["train"] + manifest["counts"]["test"] == 600
    assert manifest["class_names"] == [str(digit) for digit in range(10)]

    featurenet = json.loads((repo / "results/featurenet/metrics.json").read_text())
    assert featurenet["test_accuracy"] > 0.5, "the metric feature space must come from a classifier that learned"

    best = yaml.safe_load((repo / "results/tune/best_params.yaml").read_text())
    assert set(best) == {"lr_g", "lr_d", "beta1", "beta2"}
    trials = (repo / "results/tune/trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 2, "header plus one row per trial"

    config = json.loads((repo / "models/gan/config.json").read_text())
    assert config["steps"] == 24 and config["optimizer"] == best, "train uses the tuned optimizer settings"
    history = (repo / "results/train/history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss_d,loss_g") and len(history) == 1 + 24 // 8
    assert "[train] step 24/24" in log and "img/s" in log, "the driver shows progress"

    metrics = json.loads((repo / "results/eval/metrics.json").read_text())
    for name in ("fid", "kid", "inception_score", "precision", "recall", "density", "coverage"):
        assert math.isfinite(metrics[name]["value"]) and metrics[name]["n"] == 64
        assert math.isfinite(metrics["real_vs_real"][name]["value"])
    assert 0 <= metrics["precision"]["value"] <= 1 and 0 <= metrics["recall"]["value"] <= 1
    assert metrics["fid"]["ci95_low"] <= metrics["fid"]["ci95_high"]
    assert metrics["fid"]["value"] > metrics["real_vs_real"]["fid"]["value"], "24 steps cannot match real data"
    grid = Image.open(repo / "results/eval/samples.png")
    assert grid.format == "PNG" and grid.size[0] > 16 * 4
    assert Image.open(repo / "results/eval/curves.png").format == "PNG"

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "results/eval/metrics.json" in json.dumps(shown)


# What a newcomer reads as failure: Ray's C++ log lines (E/W + timestamp), Python warnings, errors, tracebacks.
ALARMING = re.compile(r"^\(?[^)]*\)?\s*[EWF]\d{4} |^\s*[EWF] \S+\.cc:\d+|Warning:|WARNING|Traceback|\bERROR\b|[Ee]rror:",
                      re.MULTILINE)


def test_a_healthy_run_prints_nothing_that_looks_like_a_failure(pipeline_run):
    """dvc repro of the whole chain: progress and stage summaries only, no internal noise (issue: a newcomer
    reads 'E ... core_worker.cc' and 'Matrix is singular' as failure)."""
    _, log = pipeline_run
    alarming = [line for line in log.splitlines() if ALARMING.search(line)]
    assert not alarming, "lines that look like errors or warnings:\n" + "\n".join(alarming[:20])


def test_secret_key_is_never_written(pipeline_run):
    """Credentials come from the environment; no log, output, lock file, DVC file or MLflow record holds them."""
    repo, log = pipeline_run
    secret = SECRET_ACCESS_KEY.encode()
    assert secret.decode() == os.environ["AWS_SECRET_ACCESS_KEY"], "the run used this secret"
    assert secret.decode() not in log
    # Everything the run wrote or changed: untracked and modified files (the repo's own sources, which
    # include this test's constant, are left out unless the run modified them).
    def git(*args: str) -> list[str]:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.split("\0")

    unchanged = set(git("ls-files", "-z")) - set(git("ls-files", "-z", "--modified"))
    written = [path for path in repo.rglob("*") if path.is_file() and ".git" not in path.parts
               and str(path.relative_to(repo)) not in unchanged]
    assert any(path.name == "dvc.lock" for path in written) and any(path.suffix == ".npz" for path in written)
    leaked = [path for path in written if secret in path.read_bytes()]
    assert not leaked, f"the secret key was written to {leaked}"
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    recorded = json.loads((repo / "results/register/model_version.json").read_text())
    run_data = client.get_run(recorded["run_id"]).data
    assert secret.decode() not in json.dumps([run_data.params, run_data.tags])


def test_registry_holds_the_model_with_aliases(pipeline_run):
    repo, _ = pipeline_run
    recorded = json.loads((repo / "results/register/model_version.json").read_text())
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    model = client.get_registered_model(recorded["model_name"])
    assert {alias: str(version) for alias, version in model.aliases.items()} == {
        "challenger": str(recorded["version"]), "champion": str(recorded["version"])}
    run_tags = client.get_run(recorded["run_id"]).data.tags
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert run_tags["dataset_hash"] == manifest["dataset_hash"]
    assert run_tags["git_commit"].startswith(subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo,
                                                            capture_output=True, text=True).stdout.strip())


def test_mlflow_tells_the_whole_story(pipeline_run, tracking_server):
    """One parent run for the repro; the tune trials, the training (with live step metrics and the dataset as
    input) and the registration as its children; the evaluation metrics on the logged model."""
    repo, _ = pipeline_run
    client = MlflowClient(tracking_server)
    experiment = client.get_experiment_by_name(tiny_params()["register"]["experiment"]).experiment_id
    parents = client.search_runs([experiment], "tags.stage = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["git_commit"] == head and len(parent.data.tags["dvc_lock_sha256"]) == 64
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = sorted(child.data.tags["stage"] for child in children)
    assert stages == ["register", "train", "tune", "tune"], "two tune trials, the training and the registration"

    for trial in (child for child in children if child.data.tags["stage"] == "tune"):
        assert {"lr_g", "lr_d", "beta1", "beta2"} <= set(trial.data.params) and trial.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "fid")] == [8, 16], "the score curve"
    training = next(child for child in children if child.data.tags["stage"] == "train")
    assert [m.step for m in client.get_metric_history(training.info.run_id, "loss_d")] == [8, 16, 24]
    assert [m.step for m in client.get_metric_history(training.info.run_id, "fid")] == [8, 16, 24]
    assert client.get_metric_history(training.info.run_id, "images_per_second")[0].value > 0
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    (dataset_input,) = training.inputs.dataset_inputs
    tags = {tag.key: tag.value for tag in dataset_input.tags}
    assert tags["dataset_hash"] == manifest["dataset_hash"] and tags["train_images"] == str(manifest["counts"]["train"])
    assert "gan-test-data" in dataset_input.dataset.source and "16, 16, 1" in dataset_input.dataset.schema

    recorded = json.loads((repo / "results/register/model_version.json").read_text())
    version = client.get_model_version(recorded["model_name"], str(recorded["version"]))
    logged = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    assert {metric.key for metric in logged.metrics} >= {"fid", "kid", "precision", "recall", "real_vs_real_fid"}


def test_second_repro_skips_and_params_rerun_only_dependents(pipeline_run):
    repo, _ = pipeline_run
    again = run(["dvc", "repro"], repo)
    assert "Data and pipelines are up to date" in again.stdout + again.stderr
    assert "Running stage" not in again.stdout

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["grid_size"] = 9
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    finally:
        run(["git", "checkout", "params.yaml"], repo)
    assert set(status) == {"evaluate", "register"}, f"only evaluate and register read eval.*, got {sorted(status)}"


def test_a_fresh_clone_pulls_and_reproduces_nothing(pipeline_run, tmp_path):
    """git clone + dvc pull of a committed run: nothing to reproduce, and its metrics are there to read."""
    repo, _ = pipeline_run
    commit(repo, "pipeline run")
    run(["dvc", "push"], repo)
    assert list_objects("s3://gan-dvc/cache"), "the DVC remote bucket holds the pushed cache"
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "data/prepared/manifest.json").read_bytes() == (repo / "data/prepared/manifest.json").read_bytes()
    assert (clone / "models/gan/generator_ema.pt").read_bytes() == (repo / "models/gan/generator_ema.pt").read_bytes()
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}, "every stage is up to date"
    again = run(["dvc", "repro"], clone)
    assert "Running stage" not in again.stdout + again.stderr
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], clone).stdout)
    assert "fid" in json.dumps(shown) and "test_accuracy" in json.dumps(shown), "evaluation metrics are listed"


def experiment_fids(shown: list[dict]) -> dict[str, float]:
    """Experiment name (or commit) -> its domain-FID, from `dvc exp show --json`."""
    fids = {}
    def visit(entry: dict) -> None:
        metrics = (entry.get("data") or {}).get("metrics") or {}
        evaluated = (metrics.get("results/eval/metrics.json") or {}).get("data")
        if evaluated:
            fids[entry.get("name") or entry["rev"]] = evaluated["fid"]["value"]
        for experiment in entry.get("experiments") or []:
            for revision in experiment.get("revs", []):
                visit(revision)
    for entry in shown:
        visit(entry)
    return fids


def test_experiments_run_queue_and_compare(pipeline_run):
    """`dvc exp run -S`, a queued sweep, and every experiment's metrics side by side, then diffed."""
    repo, _ = pipeline_run
    if subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout:
        commit(repo, "pipeline run")
    shorter = run(["dvc", "exp", "run", "-n", "shorter", "-S", "train.steps=16"], repo)
    assert "training from step 0" in shorter.stdout + shorter.stderr
    config = json.loads((repo / "models/gan/config.json").read_text())
    assert config["steps"] == 16, "a 16-step experiment after the 24-step run exports a 16-step model"

    run(["dvc", "exp", "run", "--queue", "-n", "grid9", "-S", "eval.grid_size=9"], repo)
    run(["dvc", "exp", "run", "--queue", "-n", "samples32", "-S", "eval.num_samples=32", "-S",
         "eval.kid_subset_size=16"], repo)
    run(["dvc", "queue", "start", "-j", "1"], repo)
    deadline = time.monotonic() + 600
    while "Queued" in (status := run(["dvc", "queue", "status"], repo).stdout) or "Running" in status:
        assert time.monotonic() < deadline, f"the queue did not finish:\n{status}"
        time.sleep(5)
    assert status.count("Success") == 2, f"both queued experiments succeed:\n{status}"

    fids = experiment_fids(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout))
    assert {"shorter", "grid9", "samples32"} <= set(fids), f"dvc exp show lists FID for every experiment: {fids}"
    assert all(math.isfinite(value) for value in fids.values())
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "shorter", "--json"], repo).stdout)
    assert "fid" in json.dumps(diff["results/eval/metrics.json"]), "the shorter run's FID differs from the baseline's"
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "shorter", "--json"], repo).stdout)["data"]
    losses = plots["losses"][0]
    assert losses["revisions"] == ["HEAD", "shorter"] and "loss_d" in json.dumps(losses["content"]), \
        "one loss plot draws both runs"


class ColourStatistics(torch.nn.Module):
    """A user's encoder exported with torch.jit (as DINOv2 or CLIP would be): per-channel mean and spread."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_unlabelled_rgb_images_run_the_whole_chain(s3_endpoint, tmp_path, tracking_server):
    """The embedded RGB dataset (600 of its photo crops, one flat prefix in the loopback S3 server: no classes):
    a self-supervised feature space, an unconditional model scored and guarded without labels (and in a user's
    TorchScript space too), and a registered version."""
    ensure_bucket("gan-test-data")
    seed("photo-patches", "gan-test-data", "photo-patches", limit=600)
    encoder = tmp_path / "colour.pt"
    torch.jit.save(torch.jit.script(ColourStatistics()), str(encoder))
    params = tiny_params(data={"source": "s3://gan-test-data/photo-patches", "channels": 3},
                         register={"model_name": "gan-photos", "max_fid_ratio": 1e6},
                         eval={"feature_spaces": {"colour": str(encoder)}})
    repo = copy_repository(tmp_path / "repo", params)
    log = run(["dvc", "repro"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log.stdout
    assert json.loads((repo / "results/featurenet/metrics.json").read_text())["kind"] == "contrastive"
    assert json.loads((repo / "models/gan/config.json").read_text())["num_classes"] == 0, "auto: unconditional"
    history = (repo / "results/train/history.csv").read_text()
    assert "class_coverage" in history.splitlines()[0], "collapse is checked on pseudo-classes"
    metrics = json.loads((repo / "results/eval/metrics.json").read_text())
    assert all(math.isfinite(metrics[name]["value"]) for name in ("fid", "kid", "precision", "recall", "coverage"))
    assert "inception_score" not in metrics and "conditional_accuracy" not in metrics, "no class probabilities"
    assert metrics["feature_spaces"] == ["featurenet", "colour"] and math.isfinite(metrics["colour"]["fid"]["value"])
    recorded = json.loads((repo / "results/register/model_version.json").read_text())
    assert recorded["model_name"] == "gan-photos" and recorded["champion"] is True
    logged = MlflowClient(tracking_server).get_run(recorded["run_id"]).data.metrics
    assert {"fid", "colour_fid", "colour_real_vs_real_fid"} <= set(logged), "every space's metrics are logged"


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A Ray head started the way a cluster is, with the Jobs API on a loopback port."""
    dashboard_port = free_port()
    # Ray 2.5x+ clusters require a token; clients send it only in token mode.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    run(["ray", "get-auth-token", "--generate"], tmp_path)
    gcs_address, log = f"127.0.0.1:{free_port()}", tmp_path / "ray-head.log"
    # In its own process group, stopped alone: `ray stop` would stop every Ray on the machine (a parallel run's too).
    head = start_node([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                       f"--port={gcs_address.split(':')[1]}", "--num-cpus=2", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"],
                      {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}, log)
    try:
        wait_for_log_line(log, "Ray runtime started", head)
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        stop_node(head)
        forget_ray_address(gcs_address)


def test_ray_job_submit_runs_the_pipeline_on_a_cluster(ray_head, seeded_bucket, tmp_path):
    repo = copy_repository(tmp_path / "job", tiny_params(data={"source": seeded_bucket}))
    tracking = f"sqlite:///{tmp_path / 'cluster-mlflow.db'}"
    submitted = run(["ray", "job", "submit", "--address", ray_head, "--working-dir", ".",
                     "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking}}),
                     "--", "dvc", "repro"], repo, timeout=1200,
                    RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES=UPLOAD_DEFAULT_EXCLUDES)
    assert "succeeded" in submitted.stdout.lower()
    for stage in STAGES:
        assert f"Running stage '{stage}'" in submitted.stdout
    model = MlflowClient(tracking_uri=tracking).get_registered_model(tiny_params()["register"]["model_name"])
    assert set(model.aliases) == {"challenger", "champion"}

    # A changed param makes a new working_dir package, so featurenet must run again on the cluster.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["featurenet"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Credentials a user may have: a token in the git remote, CI's extraheader, a password in the tracking URI.
    run(["git", "config", "remote.origin.url", f"https://ci:{SECRET_ACCESS_KEY}@git.example/gan.git"], repo)
    run(["git", "config", "http.extraheader", f"AUTHORIZATION: bearer {SECRET_ACCESS_KEY}"], repo)
    show = "echo tracking=$MLFLOW_TRACKING_URI; cat .git/config 2>/dev/null || echo no git config uploaded"
    via_cli = run(["gan", "submit", "--address", ray_head, "--entrypoint", f"dvc repro featurenet && {show}"], repo,
                  timeout=600, MLFLOW_TRACKING_URI=f"http://user:{SECRET_ACCESS_KEY}@127.0.0.1:5000")
    assert "Running stage 'featurenet'" in via_cli.stdout and "SUCCEEDED" in via_cli.stdout
    assert "no git config uploaded" in via_cli.stdout and "tracking=http://127.0.0.1:5000" in via_cli.stdout
    submission = re.search(r"submitted (gan-\S+)", via_cli.stdout).group(1)
    # In a fresh process: Ray reads RAY_AUTH_MODE once, and this one imported Ray before the head existed.
    job_info = ("import sys; from ray.job_submission import JobSubmissionClient as C;"
                " print(C(sys.argv[1]).get_job_info(sys.argv[2]).runtime_env)")
    runtime_env = run([sys.executable, "-c", job_info, ray_head, submission], repo).stdout
    assert "GAN_RAY_SUBMISSION_ID" in runtime_env, "the job's runtime env was read"
    assert SECRET_ACCESS_KEY not in via_cli.stdout + via_cli.stderr + runtime_env, "a credential leaked"
