"""Stage register: log the evaluated model to MLflow, register one version per lineage, gate `champion`.

A version is identified by its lineage (data, params, weights): re-running on unchanged inputs finds the
existing version instead of creating a duplicate. Registration and every alias move happen under a
registry-wide lock (pipelines/promotion.py), so parallel registrations cannot both "beat" the same champion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

import gancore
from gancore.models.sampler import Sampler
from pipelines.artifacts import (CURVES_FILE, EVAL_METRICS_FILE, FEATURENET_FILE, HISTORY_FILE, MODEL_DIR,
                                 PREPARED_DIR, SAMPLES_FILE, VERSION_FILE, ArtifactError, load_generator)
from pipelines.config import Params, load_params
from pipelines.dataset import read_manifest
from pipelines.errors import run_main
from pipelines.promotion import CHALLENGER, CHAMPION, alias_holder, promote, promotion_lock
from pipelines.storage import sha256_file, write_json_atomic
from pipelines.tracking import (DVC_LOCK_FILE, ENVIRONMENT_LOCK_FILE, child_run, configure_mlflow, configured_tracking_uri, file_hash,
                                git_commit, pipeline_run)

ARTIFACTS = (SAMPLES_FILE, CURVES_FILE, EVAL_METRICS_FILE, HISTORY_FILE, MODEL_DIR / "config.json",
             PREPARED_DIR / "manifest.json")
# Creating a version is not idempotent: a server that does it and then answers 5xx is asked again only after
# a search for the lineage, so the retry finds the version instead of creating a second one.
CREATE_ATTEMPTS = 3


def lineage(params: Params, manifest: dict, model_config: dict, metrics: dict) -> dict[str, str]:
    """The version's tags: what made it, and what its scores can be compared with (same data, feature space, N)."""
    shaping = {"model": params.model.model_dump(), "train": params.train.model_dump(),
               "optimizer": model_config["optimizer"], "eval": params.eval.model_dump()}
    return {
        "git_commit": git_commit(),
        "dataset_hash": manifest["dataset_hash"],
        "featurenet_sha256": sha256_file(FEATURENET_FILE),
        "eval_n": str(metrics["n"]),
        "health": model_config.get("health", "unknown"),
        "params_hash": hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest(),
        "generator_sha256": sha256_file(MODEL_DIR / "generator_ema.pt"),
        "environment_lock_sha256": (sha256_file(ENVIRONMENT_LOCK_FILE) if ENVIRONMENT_LOCK_FILE.is_file()
                                    else "none (installed without requirements.lock)"),
        **{key: str(model_config.get(key, "")) for key in ("ray_run_name", "ray_job_id", "ray_submission_id",
                                                            "mlflow_train_run_id")},
    }


def lineage_key(tags: dict[str, str]) -> str:
    # Same data, params and weights are the same model, whatever commit (a README edit, say) it came from.
    identity = [tags[key] for key in ("dataset_hash", "params_hash", "generator_sha256")]
    return hashlib.sha256("|".join(identity).encode()).hexdigest()


def find_version(client: MlflowClient, name: str, key: str):
    """The version already holding this lineage (the oldest, should there be more), or None. A failed search
    is an error, not "none": taking it for "not found" would register the same model twice."""
    found = client.search_model_versions(f"name = '{name}' and tags.lineage_key = '{key}'")
    return min(found, key=lambda version: int(version.version)) if found else None


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
    for space in metrics.get("feature_spaces", [])[1:]:  # the first is featurenet's, scored above
        flat |= {f"{space}_{key}": value for key, value in flat_metrics({**metrics[space], "n": metrics["n"]}).items()}
    return flat


@contextmanager
def dropped_log_message(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop `logger_name`'s records starting with `prefix` while the block runs; every other record passes."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def log_model_run(params: Params, metrics: dict, tags: dict[str, str], generator: torch.nn.Module, run_id: str):
    """The register run: params, lineage tags, artifacts, the logged model and the evaluation metrics linked
    to it (MLflow 3's model id), so the model's page shows its scores."""
    flat_params = {f"{section}.{key}": value for section in ("data", "model", "train", "eval")
                   for key, value in getattr(params, section).model_dump().items()}
    sampler = Sampler(generator).eval()
    example = sampler.example_inputs(4)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), sampler(example).numpy())
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(tags)
        mlflow.log_params(flat_params)
        for artifact in ARTIFACTS:
            mlflow.log_artifact(str(artifact))
        # A pickled nn.Module with gancore bundled loads back as gancore's Sampler (sampling needs its
        # latent_dim and num_classes); the local "+cpu" torch label is not installable, the release is.
        # Pickle is chosen on purpose (above); MLflow's WARNING about pickle on every registration says nothing
        # new. Only that message is dropped, and only around this call.
        with dropped_log_message("mlflow.pytorch", "Saving pytorch model by Pickle"):
            model = mlflow.pytorch.log_model(
                sampler, name="generator", signature=signature, input_example=example.numpy(),
                serialization_format="pickle", code_paths=[str(Path(gancore.__file__).parent)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        mlflow.log_metrics(flat_metrics(metrics), model_id=model.model_id)
    return model


@contextmanager
def without_http_retries() -> Iterator[None]:
    """MLflow's HTTP client retries any request after a 5xx, POSTs included: a create the server did before
    failing would be done twice. Here the caller retries, after looking for what the first attempt made."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def create_version(client: MlflowClient, name: str, model, run_id: str, tags: dict[str, str]):
    """One version for this lineage, even when the server fails after creating it."""
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        if attempt > 1 and (found := find_version(client, name, tags["lineage_key"])) is not None:
            print(f"[register] the server failed after creating version {found.version}; using it", flush=True)
            return found
        try:
            with without_http_retries():
                return client.create_model_version(name, model.model_uri, run_id=run_id, tags=tags,
                                                   model_id=model.model_id)
        except MlflowException:
            if attempt == CREATE_ATTEMPTS:
                raise
            time.sleep(2 ** attempt)


def register_version(client: MlflowClient, params: Params, metrics: dict, tags: dict[str, str], parent: str,
                     generator: torch.nn.Module):
    """The version holding this lineage: found, or logged and created. Under the promotion lock."""
    name = params.register.model_name
    version = find_version(client, name, tags["lineage_key"])
    if version is not None:
        print(f"[register] unchanged inputs: {name} version {version.version} already holds this model")
        return version
    run_id = child_run(client, parent, "register", f"register {tags['lineage_key'][:8]}")
    model = log_model_run(params, metrics, tags, generator, run_id)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = create_version(client, name, model, run_id, tags)
    print(f"[register] run {run_id} -> {name} version {version.version}")
    return version


def main() -> None:
    params = load_params()
    generator, model_config = load_generator(MODEL_DIR)
    if not EVAL_METRICS_FILE.is_file():
        raise ArtifactError(f"{EVAL_METRICS_FILE} is missing; run `dvc repro evaluate` first")
    metrics = json.loads(EVAL_METRICS_FILE.read_text())
    manifest = read_manifest(PREPARED_DIR)
    tags = lineage(params, manifest, model_config, metrics)
    tags["lineage_key"] = lineage_key(tags)
    name, settings = params.register.model_name, params.register
    client = configure_mlflow()
    with promotion_lock(client, name):
        parent = pipeline_run(client, settings.experiment, manifest["dataset_hash"])
        version = register_version(client, params, metrics, tags, parent, generator)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        _, message = promote(client, name, str(version.version), settings, reason="register")
        champion = alias_holder(client, name, CHAMPION) == str(version.version)
    print(f"[register] {CHALLENGER} -> version {version.version}; {message}")
    client.set_tag(parent, "dvc_lock_sha256", file_hash(DVC_LOCK_FILE))
    client.set_terminated(parent, "FINISHED")
    write_json_atomic(VERSION_FILE, {
        "model_name": name, "version": int(version.version), "run_id": version.run_id,
        "lineage_key": tags["lineage_key"], "champion": champion,
        "tracking_uri": configured_tracking_uri(),
    })


if __name__ == "__main__":
    run_main(main, "register")
