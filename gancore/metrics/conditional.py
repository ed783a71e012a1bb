"""Conditional fidelity: does a conditional generator draw the class it was asked for?

The idea behind the Classification Accuracy Score (Ravuri & Vinyals 2019), measured in the direction
that needs no retraining: featurenet, trained on real data, classifies the generated samples. A
generator that ignores its labels scores chance (1 / classes); one that honours them approaches
featurenet's own accuracy on held-out real images, the ceiling.
"""

import numpy as np


def conditional_accuracy(predictions: np.ndarray, requested_labels: np.ndarray) -> float:
    """Fraction of samples whose predicted class is the label they were generated for.

    `predictions`: class probabilities or logits (N, K), whose argmax is the predicted class, or the
    predicted classes (N,). `requested_labels`: the (N,) integer labels the generator was given.
    """
    predicted = np.asarray(predictions)
    requested = np.asarray(requested_labels)
    if predicted.ndim == 2:
        predicted = predicted.argmax(axis=1)
    if predicted.ndim != 1 or requested.ndim != 1 or len(predicted) != len(requested) or len(requested) == 0:
        raise ValueError(f"need (N, K) or (N,) predictions and (N,) requested labels with N >= 1, "
                         f"got {np.shape(predictions)} and {requested.shape}")
    if not np.issubdtype(requested.dtype, np.integer):
        raise ValueError(f"requested_labels must be integers, got {requested.dtype}")
    return float(np.mean(predicted == requested))
