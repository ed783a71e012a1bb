"""Stage train: Ray Train data-parallel GAN training, checkpointed in Ray storage.

The run name is a hash of everything that shapes the result, so an interrupted
`dvc repro` that is started again resumes from the stored checkpoints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import ray
import torch
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from gancore.models import build_gan
from pipelines.config import Params, load_params_or_exit
from pipelines.dataset import load_split, read_manifest
from pipelines.ray_runtime import init_ray, storage
from pipelines.storage import atomic_directory
from pipelines.worker import LoopConfig, gan_train_loop, load_checkpoint

PREPARED = Path("data/prepared")
BEST_PARAMS_FILE = Path("results/tune/best_params.yaml")
MODEL_DIR = Path("models/gan")
HISTORY_FILE = Path("results/train/history.csv")
HISTORY_FIELDS = ("step", "loss_d", "loss_g", "d_real", "d_fake", "images_per_second")


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
        print(
            f"[train] step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"
            f" | {report['images_per_second']:.0f} img/s | loss_d {report['loss_d']:.3f}"
            f" loss_g {report['loss_g']:.3f} | ETA {eta}" + (" | checkpoint saved" if checkpoint else ""),
            flush=True,
        )


def tuned_optimizer(params: Params, best_params_file: Path = BEST_PARAMS_FILE) -> dict[str, float]:
    """train.* optimizer settings, overridden by the tune stage's best trial unless train.use_tuned is false."""
    settings = params.train.optimizer()
    if params.train.use_tuned:
        if not best_params_file.is_file():
            raise FileNotFoundError(f"{best_params_file} is missing: run `dvc repro tune`, or set"
                                    " train.use_tuned: false to train with train.lr_g/lr_d/beta1/beta2 as given")
        settings.update(yaml.safe_load(best_params_file.read_text()) or {})
    return settings


# Settings that do not change what a step computes: a run with more steps (or other reporting)
# continues from the stored checkpoints instead of starting over.
NOT_SHAPING = {"steps", "log_every", "checkpoint_every", "max_failures", "storage_path", "use_tuned"}


def run_name(params: Params, optimizer: dict, dataset_hash: str) -> str:
    """The Ray run's name: a hash of everything that shapes the weights at a given step."""
    shaping = {"model": params.model.model_dump(), "train": params.train.model_dump(exclude=NOT_SHAPING),
               "optimizer": optimizer, "data": dataset_hash}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"train-{digest}"


def fit(params: Params, images_ref, optimizer: dict, name: str):
    loop = LoopConfig.from_params(
        params, images_ref, optimizer, steps=params.train.steps, report_every=params.train.log_every,
        checkpoint_every=params.train.checkpoint_every, seed=params.train.seed,
    )
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
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[ProgressLine(params.train.steps)],
        ),
    )
    return trainer.fit()


def export_model(state: dict, params: Params, image_shape: tuple, name: str, out_dir: Path) -> None:
    """models/gan/: EMA generator (the one to sample from), discriminator, and how to rebuild them."""
    channels, image_size = image_shape[3], image_shape[1]
    config = {
        "family": params.model.family,
        "latent_dim": params.model.latent_dim,
        "channels": channels,
        "image_size": image_size,
        "base_channels": params.model.base_channels,
        "loss": params.model.loss,
        "steps": state["step"],
        "ray_run_name": name,
        "ray_job_id": ray.get_runtime_context().get_job_id(),
        "ray_submission_id": os.environ.get("GAN_RAY_SUBMISSION_ID", ""),  # set by `gan submit`
        "optimizer": {key: state["config"][key] for key in params.train.optimizer()},
    }
    with atomic_directory(out_dir) as staging:
        torch.save(state["generator_ema"], staging / "generator_ema.pt")
        torch.save(state["discriminator"], staging / "discriminator.pt")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_generator(model_dir: Path = MODEL_DIR) -> tuple[torch.nn.Module, dict]:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} holds no trained model; run `dvc repro train` first")
    config = json.loads(config_file.read_text())
    generator, _ = build_gan(config["family"], config["latent_dim"], config["channels"], config["image_size"],
                             config["base_channels"])
    generator.load_state_dict(torch.load(model_dir / "generator_ema.pt", map_location="cpu", weights_only=True))
    return generator.eval(), config


def write_history(history: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    partial.replace(path)


def main() -> None:
    params = load_params_or_exit()
    manifest = read_manifest(PREPARED)
    images, _ = load_split(PREPARED, "train")
    optimizer = tuned_optimizer(params)
    name = run_name(params, optimizer, manifest["dataset_hash"])
    print(f"[train] {len(images)} images, {params.train.num_workers} workers x batch {params.train.batch_size},"
          f" {params.train.steps} steps, optimizer {optimizer}, Ray run {name}", flush=True)
    init_ray()
    result = fit(params, ray.put(images), optimizer, name)
    if result.error is not None:
        sys.exit(f"training failed: {result.error}")
    state = load_checkpoint(result.checkpoint)
    export_model(state, params, images.shape, name, MODEL_DIR)
    write_history(state["history"], HISTORY_FILE)
    print(f"[train] done: {state['step']} steps -> {MODEL_DIR}, curves in {HISTORY_FILE}", flush=True)


if __name__ == "__main__":
    main()
