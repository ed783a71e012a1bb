"""Stage evaluate: FID, KID, IS, precision/recall and density/coverage beside the real-vs-real baseline,
and for a conditional model featurenet's accuracy on the labels its samples were asked for (the
baseline: featurenet's accuracy on held-out images).

Scored in featurenet space, and in every space eval.feature_spaces names (local TorchScript encoders:
Inception-v3, DINOv2, CLIP...). The baseline compares N training images with the
N held-out ones: the score a perfect generator would get with this N and this feature space.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from gancore.images import from_uint8, make_grid
from gancore.metrics import (conditional_accuracy, encoder_features, extract, inception_score,
                             measure_all, metric_entry, one_sample_bootstrap_interval)
from gancore.step import generate_images, requested_labels
from pipelines.artifacts import (CURVES_FILE, EVAL_METRICS_FILE, HISTORY_FILE, MODEL_DIR, PREPARED_DIR, SAMPLES_FILE,
                                 load_featurenet, load_generator)
from pipelines.config import EvalParams, load_params
from pipelines.dataset import load_split, read_manifest
from pipelines.errors import run_main
from pipelines.storage import write_json_atomic


def score(features: np.ndarray, probs: np.ndarray | None, reference: np.ndarray, params: EvalParams) -> dict:
    """Every registry metric of a sample set against the real reference set, each with N and a 95% bootstrap
    interval, plus the Inception Score (over splits) from class probabilities when given."""
    result = measure_all(features, reference, params.metric_settings())
    if probs is not None:
        is_mean, is_std = inception_score(probs, splits=params.is_splits)
        result["inception_score"] = {"value": is_mean, "std_over_splits": is_std, "splits": params.is_splits,
                                     "n": len(features)}
    return result


def accuracy_score(probs: np.ndarray, labels: np.ndarray, params: EvalParams) -> dict:
    """Featurenet's accuracy against `labels` (for samples: the labels they were asked for), with N and a 95%
    percentile bootstrap interval over the (sample, label) pairs."""
    def accuracy(rows: np.ndarray) -> float:
        return conditional_accuracy(probs[rows], labels[rows])

    pairs = np.arange(len(labels))
    interval = one_sample_bootstrap_interval(accuracy, pairs, num_resamples=params.bootstrap_resamples,
                                             seed=params.seed)
    return metric_entry(accuracy(pairs), interval, len(labels), (0.0, 1.0))


def save_grid(images: torch.Tensor, path: Path, scale: int = 3) -> None:
    grid = make_grid(images, nrow=int(np.ceil(np.sqrt(len(images)))))
    picture = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST).save(path)


def plot_curves(history_file: Path, path: Path) -> None:
    with history_file.open() as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(row["step"]) for row in rows]
    figure, (losses, speed) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss_d", "loss_g"):
        losses.plot(steps, [float(row[key]) for row in rows], label=key)
    losses.set(xlabel="generator step", ylabel="loss", title="GAN losses")
    losses.legend()
    speed.plot(steps, [float(row["images_per_second"]) for row in rows])
    speed.set(xlabel="generator step", ylabel="images / s", title="throughput (all workers)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    params = load_params().eval
    generator, model_config = load_generator(MODEL_DIR)
    classifier = load_featurenet()
    # N images are drawn from a pool of 10 N per split (the whole split when smaller): memory stays bounded.
    test_images, test_labels = load_split(PREPARED_DIR, "test", limit=10 * params.num_samples)
    train_images, _ = load_split(PREPARED_DIR, "train", limit=10 * params.num_samples)
    n = min(params.num_samples, len(test_images), len(train_images))
    if n < params.num_samples:
        print(f"[evaluate] only {n} held-out images: metrics use N={n}, not eval.num_samples={params.num_samples}")
    rng = np.random.default_rng(params.seed)
    test_rows = rng.choice(len(test_images), n, replace=False)
    real_test = from_uint8(test_images[test_rows])
    real_train = from_uint8(train_images[rng.choice(len(train_images), n, replace=False)])
    fakes = generate_images(generator, n, model_config["latent_dim"], params.seed,
                            num_classes=model_config["num_classes"])

    test_features, test_probs = extract(classifier, real_test)
    train_features, train_probs = extract(classifier, real_train)
    fake_features, fake_probs = extract(classifier, fakes)
    # IS needs class probabilities: a classifier's, not a self-supervised encoder's projections.
    labelled = bool(read_manifest(PREPARED_DIR)["class_names"])
    print(f"[evaluate] scoring {n} generated and {n} real images in featurenet space", flush=True)
    generated = score(fake_features, fake_probs if labelled else None, test_features, params)
    baseline = score(train_features, train_probs if labelled else None, test_features, params)
    requested = requested_labels(n, model_config["num_classes"])
    if requested is not None:
        # The real-data value is featurenet's accuracy on held-out images: the ceiling for samples.
        generated["conditional_accuracy"] = accuracy_score(fake_probs, requested.numpy(), params)
        baseline["conditional_accuracy"] = accuracy_score(test_probs, test_labels[test_rows], params)
    metrics = {**generated, "real_vs_real": baseline, "n": n}
    for name, path in params.feature_spaces.items():
        print(f"[evaluate] scoring in the {name} space ({path})", flush=True)
        test_e, train_e, fake_e = (encoder_features(path, images) for images in (real_test, real_train, fakes))
        metrics[name] = {**score(fake_e, None, test_e, params), "real_vs_real": score(train_e, None, test_e, params)}
    metrics["feature_spaces"] = ["featurenet", *params.feature_spaces]
    write_json_atomic(EVAL_METRICS_FILE, metrics)
    save_grid(fakes[: params.grid_size], SAMPLES_FILE)
    plot_curves(HISTORY_FILE, CURVES_FILE)
    conditional = (f" conditional accuracy {generated['conditional_accuracy']['value']:.3f}"
                   f" ({baseline['conditional_accuracy']['value']:.3f})," if requested is not None else "")
    inception = (f" IS {generated['inception_score']['value']:.2f} ({baseline['inception_score']['value']:.2f}),"
                 if labelled else "")
    print(
        f"[evaluate] FID {generated['fid']['value']:.2f} (real-vs-real {baseline['fid']['value']:.2f}),"
        f" KID {generated['kid']['value']:.4f} ({baseline['kid']['value']:.4f}),"
        f"{inception}"
        f" precision {generated['precision']['value']:.3f} ({baseline['precision']['value']:.3f}),"
        f" recall {generated['recall']['value']:.3f} ({baseline['recall']['value']:.3f}),{conditional} N={n}"
        f" -> {EVAL_METRICS_FILE}, {SAMPLES_FILE}",
        flush=True,
    )


if __name__ == "__main__":
    run_main(main, "evaluate")
