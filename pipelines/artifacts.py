"""Where every stage output lives, and the formats of the trained model and its history.

dvc.yaml lists the same paths as the stages' outs (tests/unit/test_dvc_yaml.py keeps the two in step).
The stage that writes a path owns it; every other reader goes through this module, so evaluate,
register and the CLI load the model without importing the train stage or Ray.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from gancore.models import ModelSpec, build_gan
from gancore.models.classifier import Classifier
from pipelines.errors import UserError
from pipelines.storage import atomic_directory

PREPARED_DIR = Path("data/prepared")  # prepare
DATA_REPORT_FILE = Path("reports/data.json")  # prepare
FEATURENET_FILE = Path("models/featurenet.pt")  # featurenet
FEATURENET_METRICS_FILE = Path("results/featurenet/metrics.json")  # featurenet
BEST_PARAMS_FILE = Path("results/tune/best_params.yaml")  # tune
TRIALS_FILE = Path("results/tune/trials.csv")  # tune
MODEL_DIR = Path("models/gan")  # train
HISTORY_FILE = Path("results/train/history.csv")  # train
EVAL_METRICS_FILE = Path("results/eval/metrics.json")  # evaluate
SAMPLES_FILE = Path("results/eval/samples.png")  # evaluate
CURVES_FILE = Path("results/eval/curves.png")  # evaluate
VERSION_FILE = Path("results/register/model_version.json")  # register

class ArtifactError(UserError):
    """A stage input that is missing or that does not hold what it should."""


def load_tensors(path: Path, what: str):
    """torch.load of tensors and plain containers only (weights_only): a file from shared storage (an S3
    prefix, the DVC remote) that holds any other object is refused, never unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ArtifactError(f"{path} ({what}) holds objects other than tensors and plain containers, so it is not"
                            f" loaded (unpickling could run code). Delete it and rebuild it with this version."
                            f" ({str(error).strip().splitlines()[0]})") from None


HISTORY_FIELDS = ("step", "loss_d", "loss_g", "d_real", "d_fake", "d_real_sign", "augment_p", "grad_norm_d", "grad_norm_g",
                  "images_per_second",
                  "cpu_cores_busy", "peak_rss_mb", "peak_gpu_memory_mb", "fid", "class_coverage", "diversity",
                  "class_diversity", "conditional_accuracy")


def save_featurenet(classifier: Classifier, test_accuracy: float | None, reference: dict[str, np.ndarray],
                    path: Path = FEATURENET_FILE) -> None:
    """models/featurenet.pt: the classifier's weights, its shape, its held-out accuracy and the
    reference statistics of real held-out images in its space (written once, read by tune and train);
    whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    hyper = {key: getattr(classifier, key) for key in ("channels", "image_size", "num_classes", "feature_dim")}
    torch.save({"state_dict": classifier.state_dict(), "hyper": hyper, "test_accuracy": test_accuracy,
                "reference": {key: torch.from_numpy(value) for key, value in reference.items()}}, partial)
    partial.replace(path)


def _featurenet_file(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; run `dvc repro featurenet` first")
    return load_tensors(path, "featurenet")


def _classifier(saved: dict) -> Classifier:
    classifier = Classifier(**saved["hyper"])
    classifier.load_state_dict(saved["state_dict"])
    return classifier.eval()


def load_featurenet(path: Path = FEATURENET_FILE) -> Classifier:
    """The metric space: the featurenet stage's classifier, in eval mode."""
    return _classifier(_featurenet_file(path))


def load_reference(path: Path = FEATURENET_FILE) -> dict:
    """What training samples are judged against: featurenet and the reference statistics it was saved with
    (gancore.metrics.features.reference_statistics of the held-out split)."""
    saved = _featurenet_file(path)
    if "reference" not in saved:
        raise ArtifactError(f"{path} predates the stored reference statistics; run `dvc repro -f featurenet`")
    return {"classifier": _classifier(saved), **{key: value.numpy() for key, value in saved["reference"].items()}}


def export_model(state: dict, provenance: dict, out_dir: Path = MODEL_DIR) -> None:
    """models/gan/: EMA generator (the one to sample from), discriminator, and how to rebuild them.

    `state` is a finished run's checkpoint; `provenance` says which run made it (Ray run name, job ids)."""
    run = state["config"]
    config = {
        "model": run["model"],
        "recipe": run["step"],
        "latent_dim": run["model"]["latent_dim"],
        "num_classes": run["model"]["num_classes"],
        "steps": state["step"],
        **provenance,
        "optimizer": {key: run[key] for key in ("lr_g", "lr_d", "beta1", "beta2")},
    }
    with atomic_directory(out_dir) as staging:
        torch.save(state["generator_ema"], staging / "generator_ema.pt")
        torch.save(state["discriminator"], staging / "discriminator.pt")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_generator(model_dir: Path = MODEL_DIR) -> tuple[torch.nn.Module, dict]:
    """The exported EMA generator in eval mode, and its config.json."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ArtifactError(f"{model_dir} holds no trained model; run `dvc repro train` first")
    config = json.loads(config_file.read_text())
    generator, _ = build_gan(ModelSpec(**config["model"]))
    generator.load_state_dict(load_tensors(model_dir / "generator_ema.pt", "generator weights"))
    return generator.eval(), config


def write_history(history: list[dict], path: Path = HISTORY_FILE) -> None:
    """One CSV row per report, HISTORY_FIELDS as columns; written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    partial.replace(path)
