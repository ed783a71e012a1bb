"""Stage train: Ray Train data-parallel GAN training, checkpointed in Ray storage.

The run name is a hash of everything that shapes the weights (params, data, featurenet and the
training code), so an interrupted `dvc repro` that is started again resumes from the stored
checkpoints, and any change to those inputs starts a new run from step 0. A stored run that is
already past train.steps trains again from step 0 (see worker.restore): its checkpoints are not
train.steps models, and the same inputs give the same weights at every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import mlflow
import ray
import yaml
from mlflow import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError, UserCallback
from ray.train.torch import TorchTrainer

from pipelines.artifacts import (BEST_PARAMS_FILE, FEATURENET_FILE, HISTORY_FILE, MODEL_DIR, PREPARED_DIR,
                                 export_model, write_history)
from pipelines.config import ConfigError, Params, load_params
from pipelines.errors import UserError, run_main
from pipelines.dataset import read_manifest
from pipelines.ray_runtime import publish_training_data, require_resources, storage
from pipelines.storage import sha256_file
from pipelines.tracking import (child_run, configure_mlflow, fail, log_dataset, log_params, log_step_metrics,
                                pipeline_run)
from pipelines.worker import RUN_BUDGET, LoopConfig, gan_train_loop, load_checkpoint

REPOSITORY = Path(__file__).resolve().parents[2]
# The code that decides the weights at a given step: models, losses and the step (gancore), the worker
# loop and its batch order, and how params become the model spec and the recipe.
SHAPING_CODE = ("gancore", "pipelines/worker.py", "pipelines/dataset.py", "pipelines/config.py")


class TrainingStopped(UserError):
    """The run failed or was stopped as unhealthy; nothing is exported, so nothing gets registered."""


class ProgressLine(UserCallback):
    """One line per report on the driver's console: step, img/s, losses, ETA."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.started = time.monotonic()
        self.first_step: int | None = None

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0]
        step = report["step"]
        if self.first_step is None:  # a resumed run starts counting from its checkpoint
            self.first_step, self.started = step, time.monotonic()
            eta = "?"
        else:
            rate = (step - self.first_step) / max(time.monotonic() - self.started, 1e-9)
            eta = f"{(self.total_steps - step) / max(rate, 1e-9):.0f}s"
        quality = (f" | domain-FID {report['fid']:.2f} coverage {report['class_coverage']:.2f}"
                   f" diversity {report['diversity']:.2f} (per class {report['class_diversity']:.2f})"
                   if "fid" in report else "")
        if "conditional_accuracy" in report:
            quality += f" accuracy {report['conditional_accuracy']:.2f}"
        print(
            f"[train] step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"
            f" | {report['images_per_second']:.0f} img/s | {report['cpu_cores_busy']:.2f} CPU"
            f" {report['peak_rss_mb']:.0f} MB/worker"
            f" | loss_d {report['loss_d']:.3f}"
            f" loss_g {report['loss_g']:.3f}{quality} | ETA {eta}" + (" | checkpoint saved" if checkpoint else ""),
            flush=True,
        )


def tuned_optimizer(params: Params, best_params_file: Path = BEST_PARAMS_FILE) -> dict[str, float]:
    """train.* optimizer settings, overridden by the tune stage's best trial unless train.use_tuned is false."""
    settings = params.train.optimizer()
    if params.train.use_tuned:
        if not best_params_file.is_file():
            raise ConfigError(f"{best_params_file} is missing: run `dvc repro tune`, or set"
                              " train.use_tuned: false to train with train.lr_g/lr_d/beta1/beta2 as given")
        tuned = yaml.safe_load(best_params_file.read_text())
        if not isinstance(tuned, dict) or not tuned or set(tuned) - set(settings):
            raise ConfigError(f"{best_params_file} does not hold tuned optimizer settings ({sorted(settings)}):"
                              " run `dvc repro -f tune`, or set train.use_tuned: false")
        settings.update(tuned)
    return settings


# Settings that do not change what a step computes: a run with more steps (or other reporting)
# continues from the stored checkpoints instead of starting over.
NOT_SHAPING = {"steps", "log_every", "checkpoint_every", "checkpoints_kept", "max_failures", "storage_path",
               "use_tuned", "health"}


def code_digest(root: Path = REPOSITORY) -> str:
    """sha256 over the SHAPING_CODE sources under `root` (names and contents)."""
    files = sorted(file for name in SHAPING_CODE
                   for file in ([root / name] if name.endswith(".py") else (root / name).rglob("*.py")))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root)}\0".encode() + file.read_bytes() + b"\0")
    return digest.hexdigest()


def run_inputs(manifest: dict) -> dict[str, str]:
    """What shapes the weights besides params: the data, featurenet (the health checks read it) and the code."""
    return {"data": manifest["dataset_hash"], "featurenet": sha256_file(FEATURENET_FILE), "code": code_digest()}


def run_name(params: Params, optimizer: dict, inputs: dict[str, str]) -> str:
    """The Ray run's name: a hash of everything that shapes the weights at a given step (params,
    optimizer, and `inputs` from run_inputs). Same name, same run: it resumes from its checkpoints."""
    shaping = {"model": params.model.model_dump(), "train": params.train.model_dump(exclude=NOT_SHAPING),
               "optimizer": optimizer, **inputs}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"train-{digest}"


class StepMetrics(UserCallback):
    """Each report of rank 0 (losses, img/s, CPU/GPU use and, at checks, the domain-FID) as MLflow step
    metrics of the training run while it trains. Runs in the Ray Train controller, so it reaches the
    tracking store by URI."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_report(self, run_context, metrics, checkpoint):
        report = metrics[0]
        log_step_metrics(MlflowClient(self.tracking_uri), self.run_id,
                         {key: value for key, value in report.items() if key != "step"}, report["step"])


def fit(params: Params, shards, reference_ref, shape: dict, optimizer: dict, name: str,
        callbacks: tuple[UserCallback, ...] = ()):
    budget = {key: getattr(params.train, key) for key in RUN_BUDGET}
    loop = LoopConfig.from_params(params, shards, reference_ref, shape, optimizer, **budget)
    storage_path, filesystem = storage(params.train.storage_path)
    trainer = TorchTrainer(
        gan_train_loop,
        train_loop_config=loop.to_dict(),
        scaling_config=ScalingConfig(num_workers=params.train.num_workers, use_gpu=params.train.use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=params.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=params.train.checkpoints_kept),
            callbacks=[ProgressLine(params.train.steps), *callbacks],
        ),
    )
    return trainer.fit()


def worker_errors(error: TrainingFailedError) -> str:
    """The workers' own errors, one line each, instead of Ray's wrapper and tracebacks."""
    failures = getattr(error, "worker_failures", None) or {}
    lines = [f"worker {rank}: {str(failure).strip().splitlines()[-1]}" for rank, failure in sorted(failures.items())]
    return "; ".join(lines) or str(error).strip().splitlines()[-1]


def completed_state(result) -> dict:
    """The final checkpoint of a run that finished (fit() raises TrainingFailedError for one that did not) and
    stayed healthy; TrainingStopped with the reason otherwise."""
    state = load_checkpoint(result.checkpoint)
    if state.get("health_error"):
        raise TrainingStopped(f"training stopped as unhealthy, so no model is exported or registered:\n"
                              f"{state['health_error']}\nChange the params (a new run starts) and re-run.")
    return state


def train(params: Params, optimizer: dict, name: str, callbacks: tuple[UserCallback, ...]) -> dict:
    """The finished, healthy run's final checkpoint."""
    published = publish_training_data(PREPARED_DIR)
    workers = params.train.num_workers
    require_resources(workers if isinstance(workers, int) else workers[0], params.train.use_gpu)
    try:
        return completed_state(fit(params, *published, optimizer, name, callbacks))
    except TrainingFailedError as error:
        raise TrainingStopped(f"training failed: {worker_errors(error)}") from None


def start_tracking(params: Params, manifest: dict, optimizer: dict, name: str) -> tuple[MlflowClient, str, str]:
    """The pipeline's parent run and this training's child run (params, the dataset as input); before any
    compute, so an unreachable tracking server stops the stage at once."""
    client = configure_mlflow()
    parent = pipeline_run(client, params.register.experiment, manifest["dataset_hash"])
    run_id = child_run(client, parent, "train", f"train {name}", {"ray_run_name": name})
    log_params(client, run_id, {**{f"model.{key}": value for key, value in params.model.model_dump().items()},
                                **{f"train.{key}": value for key, value in params.train.model_dump().items()},
                                **{f"optimizer.{key}": value for key, value in optimizer.items()}})
    log_dataset(client, run_id, manifest, params.data.source)
    return client, parent, run_id


def main() -> None:
    params = load_params()
    manifest = read_manifest(PREPARED_DIR)
    optimizer = tuned_optimizer(params)
    name = run_name(params, optimizer, run_inputs(manifest))
    client, parent, run_id = start_tracking(params, manifest, optimizer, name)
    conditional = " conditional" if params.model.classes(len(manifest["class_names"])) else ""
    print(f"[train] {manifest['counts']['train']} images, {params.train.num_workers} workers x batch "
          f"{params.train.batch_size}, {params.train.steps} steps, {params.model.family}"
          f"{conditional}, optimizer {optimizer}, Ray run {name},"
          f" MLflow run {run_id}", flush=True)
    try:
        state = train(params, optimizer, name, (StepMetrics(mlflow.get_tracking_uri(), run_id),))
    except UserError as error:
        for failed in (run_id, parent):  # the failure and its reason stay visible in the UI
            fail(client, failed, str(error))
        raise
    export_model(state, {"ray_run_name": name, "ray_job_id": ray.get_runtime_context().get_job_id(),
                         "ray_submission_id": os.environ.get("GAN_RAY_SUBMISSION_ID", ""),  # set by `gan submit`
                         "health": "passed", "mlflow_train_run_id": run_id})
    write_history(state["history"])
    client.set_terminated(run_id, "FINISHED")
    print(f"[train] done: {state['step']} steps -> {MODEL_DIR}, curves in {HISTORY_FILE}", flush=True)


if __name__ == "__main__":
    run_main(main, "train")
