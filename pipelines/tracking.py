"""The pipeline's story in MLflow: one parent run per `dvc repro`, a child run per stage that trains.

Stages are separate processes, so they meet at the parent through a key: the git commit, params.yaml and
the prepared data's hash (or GAN_PIPELINE_RUN when a caller sets one). The first stage that needs the
parent creates it, the next ones find it while it is RUNNING, and `register` ends it. Every call goes
through MlflowClient with explicit run ids, so a Ray Train callback can log to a run it did not start.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.types.schema import Schema, TensorSpec

from pipelines.errors import UserError
from pipelines.uris import redact_credentials

DEFAULT_STORE = Path("mlflow.db")
PARAMS_FILE, DVC_LOCK_FILE = Path("params.yaml"), Path("dvc.lock")
ENVIRONMENT_LOCK_FILE = Path("requirements.lock")  # the exact package versions make setup installs
KEY_TAG, STAGE_TAG, FAILURE_TAG = "pipeline_key", "stage", "failure_reason"


def configure_mlflow(create: bool = True) -> MlflowClient:
    """MLFLOW_TRACKING_URI when set (a server, which must answer), else a sqlite store in the working directory;
    without `create`, a missing local store is an error rather than a new empty one."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith(("http://", "https://")):
        check_server(uri)
    if not uri and not create and not DEFAULT_STORE.is_file():
        raise UserError(f"no MLflow store here ({DEFAULT_STORE} is missing): run from the repository after"
                        " `dvc repro register`, or set MLFLOW_TRACKING_URI to your tracking server")
    # An absolute path: MLflow caches stores by URI, and a relative one would outlive a change of directory.
    mlflow.set_tracking_uri(uri or f"sqlite:///{DEFAULT_STORE.resolve()}")
    return MlflowClient()


def configured_tracking_uri() -> str:
    """The tracking URI as the user configured it, for committed files: MLFLOW_TRACKING_URI without credentials,
    or the default store relative to the repository (never this machine's absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    # mlflow.set_tracking_uri exports its URI to the environment, so the default store shows up there absolute.
    if not uri or uri == f"sqlite:///{DEFAULT_STORE.resolve()}":
        return f"sqlite:///{DEFAULT_STORE}"
    return redact_credentials(uri)


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail at once with the fix when the tracking server does not answer, instead of after MLflow's retries:
    stages call this before any compute, so an unreachable server costs seconds, not a training run."""
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except requests.RequestException as error:
        raise UserError(f"the MLflow tracking server at {redact_credentials(uri)} does not answer"
                        f" ({type(error).__name__}); start it, fix MLFLOW_TRACKING_URI, or unset it to use the"
                        f" local store {DEFAULT_STORE}") from None


def git_commit(mark_dirty: bool = True) -> str:
    """HEAD, with "-dirty" when tracked files differ from it (and `mark_dirty`)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = mark_dirty and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # With the local sqlite default, artifacts go next to it rather than in the server's default root.
    location = None if "MLFLOW_TRACKING_URI" in os.environ else Path("mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as error:  # another stage or registration created it meanwhile
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def pipeline_run(client: MlflowClient, experiment: str, dataset_hash: str) -> str:
    """The id of this `dvc repro`'s parent run: found while RUNNING, else created (tagged with the commit)."""
    # The bare commit: each stage's outputs (dvc.lock, results/) make the tree dirty for the next one.
    commit = git_commit(mark_dirty=False)
    key = os.environ.get("GAN_PIPELINE_RUN") or hashlib.sha256(
        f"{commit}|{file_hash(PARAMS_FILE)}|{dataset_hash}".encode()).hexdigest()[:16]
    experiment_id = ensure_experiment(client, experiment)
    running = client.search_runs([experiment_id], f"tags.{KEY_TAG} = '{key}' and attributes.status = 'RUNNING'",
                                 max_results=1, order_by=["attributes.start_time DESC"])
    if running:
        return running[0].info.run_id
    tags = {KEY_TAG: key, STAGE_TAG: "pipeline", "git_commit": commit, "dataset_hash": dataset_hash,
            "mlflow.runName": f"pipeline {commit[:8]} {time.strftime('%Y-%m-%d %H:%M')}"}
    return client.create_run(experiment_id, tags=tags).info.run_id


def child_run(client: MlflowClient, parent_id: str, stage: str, name: str, tags: dict | None = None) -> str:
    parent = client.get_run(parent_id)
    run_tags = {"mlflow.parentRunId": parent_id, "mlflow.runName": name, STAGE_TAG: stage,
                KEY_TAG: parent.data.tags.get(KEY_TAG, ""), **(tags or {})}
    return client.create_run(parent.info.experiment_id, tags=run_tags).info.run_id


def log_params(client: MlflowClient, run_id: str, values: dict) -> None:
    params = [Param(key, str(value)[:6000]) for key, value in values.items()]
    for start in range(0, len(params), 100):  # the REST API takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])


def log_step_metrics(client: MlflowClient, run_id: str, values: dict, step: int) -> None:
    """Numeric, finite values only, as one batch: the UI charts each key over `step`."""
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step) for key, value in values.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)]
    client.log_batch(run_id, metrics=metrics)


def fail(client: MlflowClient, run_id: str, reason: str) -> None:
    """End a run as FAILED with the reason where the UI shows it."""
    client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, "FAILED")


def log_dataset(client: MlflowClient, run_id: str, manifest: dict, source: str) -> None:
    """The training data as an MLflow input: its source URI, dataset hash, counts and image shape."""
    size, channels = manifest["image_size"], manifest["channels"]
    schema = Schema([TensorSpec(np.dtype("uint8"), (-1, size, size, channels), "images")])
    dataset = MetaDataset(resolve_dataset_source(source), name=Path(source.rstrip("/")).name or source,
                          digest=manifest["dataset_hash"][:36], schema=schema)
    counts = {f"{split}_images": str(count) for split, count in manifest["counts"].items()}
    tags = [InputTag("mlflow.data.context", "training"), InputTag("dataset_hash", manifest["dataset_hash"]),
            InputTag("classes", str(len(manifest["class_names"]))), *(InputTag(k, v) for k, v in counts.items())]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])
