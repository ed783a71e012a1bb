"""Feature and class-probability extraction with a classifier exposing `features(x)` and `forward(x)`."""

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch import nn

from gancore.metrics.fid import gaussian_statistics


@torch.no_grad()
def extract(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, D) and softmax probabilities (N, K) of images (N, C, H, W) in [-1, 1]."""
    was_training = classifier.training
    classifier.eval()
    try:
        device = next(classifier.parameters()).device
        features, probs = [], []
        for batch in images.split(batch_size):
            batch = batch.to(device=device, dtype=torch.float32)
            features.append(classifier.features(batch).double().cpu())
            probs.append(torch.softmax(classifier(batch).double(), dim=1).cpu())
    finally:
        classifier.train(was_training)
    return torch.cat(features).numpy(), torch.cat(probs).numpy()


def reference_statistics(features: np.ndarray, labels: np.ndarray | None, keep: int = 1000,
                         modes: int = 10) -> dict[str, np.ndarray]:
    """What samples are compared against while training: the Gaussian statistics of real features
    (domain-FID), the k-means centroids of `modes` modes of the features (the collapse check counts these,
    labelled or not), and a fixed random subset of `keep` features with their modes and, when labelled,
    their classes (diversity checks)."""
    mu, sigma = gaussian_statistics(features)
    centroids = pseudo_class_centroids(features, modes)
    subset = np.random.default_rng(0).permutation(len(features))[:keep]
    reference = {"mu": mu, "sigma": sigma, "centroids": centroids, "features": features[subset],
                 "modes": pseudo_classes(features[subset], centroids)}
    return reference if labels is None else {**reference, "classes": labels[subset]}


def feature_reference(classifier: nn.Module, images: torch.Tensor, labels: np.ndarray | None) -> dict:
    """The classifier and reference_statistics of real `images` (in [-1, 1]) in its feature space."""
    features, _ = extract(classifier, images)
    return {"classifier": classifier.cpu().eval(), **reference_statistics(features, labels)}


def pseudo_class_centroids(features: np.ndarray, classes: int = 10, seed: int = 0) -> np.ndarray:
    """k-means centroids (classes, D) of real features: the modes a label-free collapse check counts."""
    centroids, _ = kmeans2(np.asarray(features, np.float64), classes, minit="++", seed=seed)
    return centroids


def pseudo_classes(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each feature's nearest centroid: its pseudo-class."""
    distances = ((features[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    return distances.argmin(axis=1).astype(np.int64)
