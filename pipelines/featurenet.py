"""Stage featurenet: a small domain classifier whose penultimate layer is the metric space.

No Inception weights can be downloaded on every machine, so FID/KID/IS are
computed in the feature space of a classifier trained on the prepared data.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gancore.images import from_uint8
from gancore.metrics.features import extract, reference_statistics
from gancore.models.classifier import Classifier
from pipelines.artifacts import FEATURENET_FILE, FEATURENET_METRICS_FILE, PREPARED_DIR, save_featurenet
from pipelines.config import FeaturenetParams, load_params
from pipelines.errors import run_main
from pipelines.dataset import DatasetError, load_split, read_manifest
from pipelines.storage import write_json_atomic

FEATURENET_IMAGES = 100_000  # per split: enough for a 10-class feature extractor, and bounded in memory


def train_featurenet(
    images: np.ndarray, labels: np.ndarray, num_classes: int, params: FeaturenetParams
) -> Classifier:
    torch.manual_seed(params.seed)
    inputs, targets = from_uint8(images), torch.from_numpy(labels)
    classifier = Classifier(inputs.shape[1], inputs.shape[2], num_classes, params.feature_dim)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=params.lr)
    steps_per_epoch = max(1, len(inputs) // params.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=params.epochs * steps_per_epoch)
    classifier.train()
    for epoch in range(params.epochs):
        order = torch.randperm(len(inputs))
        progress = tqdm(range(steps_per_epoch), desc=f"featurenet epoch {epoch + 1}/{params.epochs}", unit="batch")
        for batch in progress:
            index = order[batch * params.batch_size : (batch + 1) * params.batch_size]
            loss = F.cross_entropy(classifier(inputs[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return classifier.eval()


@torch.no_grad()
def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    logits = torch.cat([classifier(batch) for batch in from_uint8(images).split(512)])
    return float((logits.argmax(1).numpy() == labels).mean())


def main() -> None:
    params = load_params()
    manifest = read_manifest(PREPARED_DIR)
    if not manifest["class_names"]:
        raise DatasetError("featurenet needs labelled data (class sub-folders under data.source); the prepared data"
                           " has none")
    train_images, train_labels = load_split(PREPARED_DIR, "train", limit=FEATURENET_IMAGES)
    test_images, test_labels = load_split(PREPARED_DIR, "test", limit=FEATURENET_IMAGES)
    classifier = train_featurenet(train_images, train_labels, len(manifest["class_names"]), params.featurenet)
    test_accuracy = accuracy(classifier, test_images, test_labels)
    reference = test_images[: params.featurenet.reference_images], test_labels[: params.featurenet.reference_images]
    features, _ = extract(classifier, from_uint8(reference[0]))
    save_featurenet(classifier, test_accuracy, reference_statistics(features, reference[1]))
    write_json_atomic(FEATURENET_METRICS_FILE, {"test_accuracy": test_accuracy, "test_images": int(len(test_labels))})
    print(f"featurenet: test accuracy {test_accuracy:.4f} on {len(test_labels)} held-out images -> {FEATURENET_FILE}")


if __name__ == "__main__":
    run_main(main, "featurenet")
