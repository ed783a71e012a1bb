"""k-NN manifold metrics: precision/recall (Kynkäänniemi et al., 2019), density/coverage (Naeem et al., 2020).

Semantics follow the authors' reference code (clovaai/generative-evaluation-prdc): each point's ball has radius
equal to the distance to its k-th nearest neighbour in its own set (the point itself excluded), and a point lies
in a ball only when strictly closer than the radius. Every function takes (real, fake) in that order; precision
and density measure fidelity of the fakes, recall and coverage measure how much of the real set they reach.
Distances are computed a block of rows at a time, so memory grows with N, not N^2.
"""

from collections.abc import Iterator

import numpy as np

from gancore.metrics._validate import as_features, check_same_dim

# Distances held at once per block: 2^23 float64 values is 64 MiB (N = M = 10k, D = 2048 needs ~840 rows a block).
_BLOCK_ELEMENTS = 1 << 23


def _with_radii(features: np.ndarray, name: str, k: int) -> np.ndarray:
    """Checked features of a set whose points get k-NN radii (checked before `as_features` for a k-specific error)."""
    n = np.shape(features)[0] if np.ndim(features) == 2 else None
    if n is not None and n <= k:
        raise ValueError(
            f"{name} has N={n} samples; a k={k} nearest-neighbour radius needs N > k: pass more or lower k"
        )
    return as_features(features, name)


def _row_blocks(num_rows: int, num_cols: int, chunk_rows: int | None) -> Iterator[slice]:
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    rows = chunk_rows or max(1, _BLOCK_ELEMENTS // num_cols)
    for start in range(0, num_rows, rows):
        yield slice(start, min(start + rows, num_rows))


def _squared_distances(rows: np.ndarray, others: np.ndarray, others_sq_norms: np.ndarray) -> np.ndarray:
    """(len(rows), len(others)) squared Euclidean distances, clipped at 0 against rounding."""
    distances = (rows * rows).sum(axis=1)[:, None] + others_sq_norms[None, :] - 2.0 * rows @ others.T
    return np.maximum(distances, 0.0, out=distances)


def _knn_sq_radii(x: np.ndarray, k: int, chunk_rows: int | None) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row."""
    sq_norms = (x * x).sum(axis=1)
    radii = np.empty(len(x))
    for block in _row_blocks(len(x), len(x), chunk_rows):
        distances = _squared_distances(x[block], x, sq_norms)
        rows = np.arange(block.stop - block.start)
        distances[rows, rows + block.start] = np.inf  # a point is not its own neighbour; duplicates still count
        radii[block] = np.partition(distances, k - 1, axis=1)[:, k - 1]
    return radii


def _prepare(
    real_features: np.ndarray, fake_features: np.ndarray, k: int, fake_radii: bool
) -> tuple[np.ndarray, np.ndarray]:
    if k < 1:
        raise ValueError(f"k must be a positive number of neighbours, got {k}")
    real = _with_radii(real_features, "real_features", k)
    fake = _with_radii(fake_features, "fake_features", k) if fake_radii else as_features(fake_features, "fake_features")
    check_same_dim(real, fake)
    # Distances are translation-invariant; centring shrinks the norms that cancel in ||a||^2 + ||b||^2 - 2ab.
    center = real.mean(axis=0)
    return real - center, fake - center


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, *, chunk_rows: int | None = None
) -> tuple[float, float]:
    """Precision (fakes inside some real k-NN ball) and recall (reals inside some fake k-NN ball).

    Both sets need more than k samples. `chunk_rows` bounds the rows of each distance block (default: a
    block of about 64 MiB).
    """
    real, fake = _prepare(real_features, fake_features, k, fake_radii=True)
    real_radii, fake_radii = _knn_sq_radii(real, k, chunk_rows), _knn_sq_radii(fake, k, chunk_rows)
    fake_sq_norms = (fake * fake).sum(axis=1)
    fake_in_real_ball = np.zeros(len(fake), dtype=bool)
    real_in_fake_ball = np.empty(len(real), dtype=bool)
    for block in _row_blocks(len(real), len(fake), chunk_rows):
        distances = _squared_distances(real[block], fake, fake_sq_norms)
        fake_in_real_ball |= (distances < real_radii[block, None]).any(axis=0)
        real_in_fake_ball[block] = (distances < fake_radii[None, :]).any(axis=1)
    return float(fake_in_real_ball.mean()), float(real_in_fake_ball.mean())


def density_coverage(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 5, *, chunk_rows: int | None = None
) -> tuple[float, float]:
    """Density (real k-NN balls containing each fake, over k, averaged) and coverage (reals whose ball holds a fake).

    Only the real set needs more than k samples. Same-distribution sets give density about 1 and coverage about
    1 - prod_{i=1..k} (N - i) / (N + M - i); density can exceed 1 when fakes crowd dense real regions.
    """
    real, fake = _prepare(real_features, fake_features, k, fake_radii=False)
    real_radii = _knn_sq_radii(real, k, chunk_rows)
    fake_sq_norms = (fake * fake).sum(axis=1)
    balls_per_fake = np.zeros(len(fake), dtype=np.int64)
    real_ball_has_fake = np.empty(len(real), dtype=bool)
    for block in _row_blocks(len(real), len(fake), chunk_rows):
        inside = _squared_distances(real[block], fake, fake_sq_norms) < real_radii[block, None]
        balls_per_fake += inside.sum(axis=0)
        real_ball_has_fake[block] = inside.any(axis=1)
    return float(balls_per_fake.mean() / k), float(real_ball_has_fake.mean())


def precision(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> float:
    """Precision of `precision_recall`, as one number for `estimate_with_interval`."""
    return precision_recall(real_features, fake_features, k)[0]


def recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> float:
    """Recall of `precision_recall`, as one number for `estimate_with_interval`."""
    return precision_recall(real_features, fake_features, k)[1]


def density(real_features: np.ndarray, fake_features: np.ndarray, k: int = 5) -> float:
    """Density of `density_coverage`, as one number for `estimate_with_interval`."""
    return density_coverage(real_features, fake_features, k)[0]


def coverage(real_features: np.ndarray, fake_features: np.ndarray, k: int = 5) -> float:
    """Coverage of `density_coverage`, as one number for `estimate_with_interval`."""
    return density_coverage(real_features, fake_features, k)[1]
