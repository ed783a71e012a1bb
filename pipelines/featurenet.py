"""Stage featurenet: the metric feature space, trained on the prepared data.

No Inception weights can be downloaded on every machine, so FID/KID and the rest are computed in a space
learnt from the data itself: with class labels, the penultimate layer of a classifier of them (and IS from
its class probabilities); without, a self-supervised SimCLR encoder (gancore.contrastive), whose k-means
pseudo-classes stand in for classes in the training health checks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gancore.contrastive import nt_xent, random_view
from gancore.images import from_uint8
from gancore.metrics.features import extract, pseudo_class_centroids, pseudo_classes, reference_statistics
from gancore.models.classifier import Classifier
from pipelines.artifacts import FEATURENET_FILE, FEATURENET_METRICS_FILE, PREPARED_DIR, save_featurenet
from pipelines.config import FeaturenetParams, load_params
from pipelines.dataset import DatasetError, load_split, read_manifest
from pipelines.errors import run_main
from pipelines.storage import write_json_atomic

FEATURENET_IMAGES = 100_000  # per split: enough for a 10-class feature extractor, and bounded in memory
MIN_ENCODER_IMAGES = 256  # a contrastive batch needs other images to tell each one from
PROJECTION_DIM = 64  # SimCLR's projection head; the metric space is the layer before it
PSEUDO_CLASSES = 10  # k-means modes of the real features that stand in for classes without labels


def fit(model: Classifier, inputs: torch.Tensor, params: FeaturenetParams, loss_of, what: str) -> Classifier:
    """One-cycle Adam over shuffled batches of `inputs`, minimising loss_of(model, batch rows)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    steps_per_epoch = max(1, len(inputs) // params.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=params.epochs * steps_per_epoch)
    model.train()
    for epoch in range(params.epochs):
        order = torch.randperm(len(inputs))
        progress = tqdm(range(steps_per_epoch), desc=f"{what} epoch {epoch + 1}/{params.epochs}", unit="batch")
        for batch in progress:
            loss = loss_of(model, order[batch * params.batch_size : (batch + 1) * params.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def train_featurenet(images: np.ndarray, labels: np.ndarray, num_classes: int, params: FeaturenetParams) -> Classifier:
    """Labelled data: a classifier of the classes (its penultimate layer is the space)."""
    torch.manual_seed(params.seed)
    inputs, targets = from_uint8(images), torch.from_numpy(labels)
    classifier = Classifier(inputs.shape[1], inputs.shape[2], num_classes, params.feature_dim)
    return fit(classifier, inputs, params, lambda model, rows: F.cross_entropy(model(inputs[rows]), targets[rows]),
               "featurenet")


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

    return fit(encoder, inputs, params, loss_of, "encoder (SimCLR)")


@torch.no_grad()
def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    logits = torch.cat([classifier(batch) for batch in from_uint8(images).split(512)])
    return float((logits.argmax(1).numpy() == labels).mean())


def reference(featurenet: Classifier, images: np.ndarray, labels: np.ndarray, labelled: bool) -> dict:
    """The held-out images' statistics in the new space; without labels, their k-means pseudo-classes (and
    the centroids that assign them) stand in for classes in the collapse and diversity checks."""
    features, _ = extract(featurenet, from_uint8(images))
    if labelled:
        return reference_statistics(features, labels)
    centroids = pseudo_class_centroids(features, PSEUDO_CLASSES)
    return {**reference_statistics(features, pseudo_classes(features, centroids)), "centroids": centroids}


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
                    reference(featurenet, test_images[:keep], test_labels[:keep], labelled))
    write_json_atomic(FEATURENET_METRICS_FILE, {**summary, "test_images": int(len(test_labels))})
    print(f"featurenet: {summary} ({len(test_labels)} held-out images) -> {FEATURENET_FILE}")


if __name__ == "__main__":
    run_main(main, "featurenet")
