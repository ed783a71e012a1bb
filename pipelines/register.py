"""Stage register: log the run to MLflow, register a model version, gate the champion alias.

A version is identified by its lineage (data, code, params, weights): re-running
on unchanged inputs finds the existing version instead of creating a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import mlflow
import requests
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

import gancore
from gancore.metrics import SET_METRICS
from gancore.models.sampler import Sampler
from pipelines.artifacts import (CURVES_FILE, EVAL_METRICS_FILE, HISTORY_FILE, MODEL_DIR, PREPARED_DIR, SAMPLES_FILE,
                                 VERSION_FILE, ArtifactError, load_generator)
from pipelines.config import Params, load_params
from pipelines.errors import UserError, run_main
from pipelines.dataset import read_manifest
from pipelines.storage import sha256_file, write_json_atomic
from pipelines.uris import redact_credentials

ARTIFACTS = (SAMPLES_FILE, CURVES_FILE, EVAL_METRICS_FILE, HISTORY_FILE, MODEL_DIR / "config.json",
             PREPARED_DIR / "manifest.json")
DEFAULT_STORE = Path("mlflow.db")
CHALLENGER, CHAMPION = "challenger", "champion"


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


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail at once with the fix when the tracking server does not answer, instead of after MLflow's retries."""
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except requests.RequestException as error:
        raise UserError(f"the MLflow tracking server at {redact_credentials(uri)} does not answer"
                        f" ({type(error).__name__}); start it, fix MLFLOW_TRACKING_URI, or unset it to use the"
                        f" local store {DEFAULT_STORE}") from None


def ensure_experiment(name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # With the local sqlite default, artifacts go next to it rather than in the server's default root.
    location = None if "MLFLOW_TRACKING_URI" in os.environ else Path("mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def lineage(params: Params, manifest: dict, model_config: dict) -> dict[str, str]:
    shaping = {"model": params.model.model_dump(), "train": params.train.model_dump(),
               "optimizer": model_config["optimizer"], "eval": params.eval.model_dump()}
    return {
        "git_commit": git_commit(),
        "dataset_hash": manifest["dataset_hash"],
        "params_hash": hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest(),
        "generator_sha256": sha256_file(MODEL_DIR / "generator_ema.pt"),
        "ray_run_name": model_config["ray_run_name"],
        "ray_job_id": model_config["ray_job_id"],
        "ray_submission_id": model_config["ray_submission_id"],
    }


def lineage_key(tags: dict[str, str]) -> str:
    # Same data, params and weights are the same model, whatever commit (a README edit, say) it came from.
    identity = [tags[key] for key in ("dataset_hash", "params_hash", "generator_sha256")]
    return hashlib.sha256("|".join(identity).encode()).hexdigest()


def gate_value(client: MlflowClient, name: str, version: str, metric: str) -> float:
    run = client.get_run(client.get_model_version(name, version).run_id)
    if metric not in run.data.metrics:
        raise MlflowException(f"version {version} of {name} has no metric {metric!r} to compare")
    return run.data.metrics[metric]


def promote(client: MlflowClient, name: str, version: str, metric: str, alias: str = CHAMPION,
            force: bool = False) -> tuple[bool, str]:
    """Point `alias` at `version` when its metric beats the current holder's (in the registry's direction)."""
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        return False, f"{alias} already is version {version}"
    candidate = gate_value(client, name, version, metric)
    if current is not None and not force:
        holder = gate_value(client, name, current.version, metric)
        if not SET_METRICS[metric].better(candidate, holder):
            return False, (f"version {version} ({metric} {candidate:.4f}) does not beat {alias} version"
                           f" {current.version} ({metric} {holder:.4f}); {alias} unchanged (use --force to override)")
    client.set_registered_model_alias(name, alias, str(version))
    previous = f" (was version {current.version})" if current is not None else ""
    return True, f"{alias} -> version {version} ({metric} {candidate:.4f}){previous}"


def find_version(client: MlflowClient, name: str, key: str):
    """The version already holding this lineage, or None. A failed search is an error, not "none": taking it
    for "not found" would register the same model twice when the server has a bad moment."""
    found = client.search_model_versions(f"name = '{name}' and tags.lineage_key = '{key}'")
    return found[0] if found else None


def flat_metrics(metrics: dict) -> dict[str, float]:
    """Every scored value of results/eval/metrics.json and its interval as MLflow metrics, e.g. real_vs_real_fid,
    conditional_accuracy_ci95_low."""
    flat = {"eval_n": metrics["n"]}
    for prefix, section in (("", metrics), ("real_vs_real_", metrics["real_vs_real"])):
        for name, entry in section.items():
            if isinstance(entry, dict) and "value" in entry:
                flat[f"{prefix}{name}"] = entry["value"]
                flat |= {f"{prefix}{name}_{bound}": entry[bound] for bound in ("ci95_low", "ci95_high")
                         if bound in entry}
    if "inception_v3" in metrics:
        flat |= {f"inception_v3_{key}": value for key, value in flat_metrics({**metrics["inception_v3"],
                                                                              "n": metrics["n"]}).items()}
    return flat


def log_run(params: Params, metrics: dict, tags: dict[str, str], generator: torch.nn.Module):
    flat_params = {f"{section}.{key}": value for section in ("data", "model", "train", "eval")
                   for key, value in getattr(params, section).model_dump().items()}
    sampler = Sampler(generator).eval()
    example = sampler.example_inputs(4)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), sampler(example).numpy())
    with mlflow.start_run(experiment_id=ensure_experiment(params.register.experiment)) as run:
        mlflow.set_tags(tags)
        mlflow.log_params(flat_params)
        mlflow.log_metrics(flat_metrics(metrics))
        for artifact in ARTIFACTS:
            mlflow.log_artifact(str(artifact))
        # A pickled nn.Module with gancore bundled loads back as gancore's Sampler (sampling needs its
        # latent_dim and num_classes); the local "+cpu" torch label is not installable, the release is.
        model = mlflow.pytorch.log_model(
            sampler, name="generator", signature=signature, input_example=example.numpy(),
            serialization_format="pickle", code_paths=[str(Path(gancore.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return run, model


def main() -> None:
    params = load_params()
    generator, model_config = load_generator(MODEL_DIR)
    if not EVAL_METRICS_FILE.is_file():
        raise ArtifactError(f"{EVAL_METRICS_FILE} is missing; run `dvc repro evaluate` first")
    metrics = json.loads(EVAL_METRICS_FILE.read_text())
    tags = lineage(params, read_manifest(PREPARED_DIR), model_config)
    key = lineage_key(tags)
    name = params.register.model_name
    client = configure_mlflow()

    version = find_version(client, name, key)
    if version is not None:
        print(f"[register] unchanged inputs: {name} version {version.version} already holds this model")
    else:
        run, model = log_run(params, metrics, tags, generator)
        version = mlflow.register_model(model.model_uri, name, tags={"lineage_key": key, **tags})
        print(f"[register] run {run.info.run_id} -> {name} version {version.version}")
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    _, message = promote(client, name, version.version, params.register.gate_metric)
    print(f"[register] {CHALLENGER} -> version {version.version}; {message}")
    write_json_atomic(VERSION_FILE, {
        "model_name": name, "version": int(version.version), "run_id": version.run_id,
        "lineage_key": key,
        "champion": str(client.get_model_version_by_alias(name, CHAMPION).version) == str(version.version),
        "tracking_uri": redact_credentials(mlflow.get_tracking_uri()),
    })


if __name__ == "__main__":
    run_main(main, "register")
