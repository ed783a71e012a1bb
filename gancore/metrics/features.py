"""Feature and class-probability extraction with a classifier exposing `features(x)` and `forward(x)`."""

import numpy as np
import torch
from torch import nn


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
