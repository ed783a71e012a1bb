"""Stage featurenet: the metric feature space, trained on the prepared data.

No Inception weights can be downloaded on every machine, so FID/KID and the rest are computed in a space
learnt from the data itself: with class labels, the penultimate layer of a classifier of them (and IS from
its class probabilities); without, a self-supervised SimCLR encoder (gancore.contrastive). Either way the
training health checks count k-means modes of the held-out features, not classes.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gancore.contrastive import nt_xent, random_view
from gancore.images import from_uint8
from gancore.metrics.features import extract, reference_statistics
from gancore.models.classifier import Classifier
from pipelines.artifacts import FEATURENET_FILE, FEATURENET_METRICS_FILE, PREPARED_DIR, save_featurenet
from pipelines.config import FeaturenetParams, load_params
from pipelines.dataset import DatasetError, load_split, read_manifest
from pipelines.errors import run_main
from pipelines.storage import write_json_atomic

FEATURENET_IMAGES = 100_000  # per split: enough for a 10-class feature extractor, and bounded in memory
MIN_ENCODER_IMAGES = 256  # a contrastive batch needs other images to tell each one from
PROJECTION_DIM = 64  # SimCLR's projection head; the metric space is the layer before it
PSEUDO_CLASSES = 10  # k-means modes of the real features: what the collapse check counts


def fit(model: Classifier, inputs: torch.Tensor, params: FeaturenetParams, epochs: int, loss_of,
        what: str) -> Classifier:
    """One-cycle Adam over `epochs` of shuffled batches of `inputs`, minimising loss_of(model, batch rows)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    steps_per_epoch = batches_per_epoch(len(inputs), params)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs))
        progress = tqdm(range(steps_per_epoch), desc=f"{what} epoch {epoch + 1}/{epochs}", unit="batch")
        for batch in progress:
            loss = loss_of(model, order[batch * params.batch_size : (batch + 1) * params.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def batches_per_epoch(images: int, params: FeaturenetParams) -> int:
    return max(1, images // params.batch_size)


def train_featurenet(images: np.ndarray, labels: np.ndarray, num_classes: int, params: FeaturenetParams) -> Classifier:
    """Labelled data: a classifier of the classes (its penultimate layer is the space)."""
    torch.manual_seed(params.seed)
    inputs, targets = from_uint8(images), torch.from_numpy(labels)
    classifier = Classifier(inputs.shape[1], inputs.shape[2], num_classes, params.feature_dim)
    return fit(classifier, inputs, params, params.epochs,
               lambda model, rows: F.cross_entropy(model(inputs[rows]), targets[rows]), "featurenet")


def train_encoder(images: np.ndarray, params: FeaturenetParams) -> Classifier:
    """Unlabelled data: a SimCLR encoder (gancore.contrastive); the classifier's head is its projection head."""
    if len(images) < MIN_ENCODER_IMAGES:
        raise DatasetError(f"the prepared train split has {len(images)} images; a self-supervised feature space needs"
                           f" at least {MIN_ENCODER_IMAGES} (add images, or label them in class folders)")
    torch.manual_seed(params.seed)
    inputs, views = from_uint8(images), torch.Generator().manual_seed(params.seed)
    encoder = Classifier(inputs.shape[1], inputs.shape[2], PROJECTION_DIM, params.feature_dim)

    def loss_of(model: Classifier, rows: torch.Tensor) -> torch.Tensor:
        batch = inputs[rows]
        return nt_xent(model(random_view(batch, views)), model(random_view(batch, views)))

    # Steps, not epochs: contrastive learning needs hundreds of updates whatever the dataset's size.
    epochs = math.ceil(params.encoder_steps / batches_per_epoch(len(inputs), params))
    return fit(encoder, inputs, params, epochs, loss_of, "encoder (SimCLR)")


@torch.no_grad()
def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    logits = torch.cat([classifier(batch) for batch in from_uint8(images).split(512)])
    return float((logits.argmax(1).numpy() == labels).mean())


def reference(featurenet: Classifier, images: np.ndarray, labels: np.ndarray | None) -> dict:
    """The held-out images' statistics in the new space, with the k-means modes of their features that the
    collapse and diversity checks count (for labelled and unlabelled data alike)."""
    features, _ = extract(featurenet, from_uint8(images))
    return reference_statistics(features, labels, modes=PSEUDO_CLASSES)


def main() -> None:
    params = load_params()
    manifest = read_manifest(PREPARED_DIR)
    labelled = bool(manifest["class_names"])
    train_images, train_labels = load_split(PREPARED_DIR, "train", limit=FEATURENET_IMAGES)
    test_images, test_labels = load_split(PREPARED_DIR, "test", limit=FEATURENET_IMAGES)
    if labelled:
        featurenet = train_featurenet(train_images, train_labels, len(manifest["class_names"]), params.featurenet)
        summary = {"kind": "classifier", "test_accuracy": accuracy(featurenet, test_images, test_labels)}
    else:
        featurenet = train_encoder(train_images, params.featurenet)
        summary = {"kind": "contrastive"}
    keep = params.featurenet.reference_images
    save_featurenet(featurenet, summary.get("test_accuracy"),
                    reference(featurenet, test_images[:keep], test_labels[:keep] if labelled else None))
    write_json_atomic(FEATURENET_METRICS_FILE, {**summary, "test_images": int(len(test_labels))})
    print(f"featurenet: {summary} ({len(test_labels)} held-out images) -> {FEATURENET_FILE}")


if __name__ == "__main__":
    run_main(main, "featurenet")
