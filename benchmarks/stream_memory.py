"""Training memory against dataset size: the same Ray Train worker on a train split 10x larger.

    python -m benchmarks.stream_memory [--images 100000] [--image-size 64] [--shard-size 500]

Builds synthetic RGB train splits of images/10 and images images (coloured squares on a coloured
background, plus noise), shard by shard, straight into the Ray object store as train does, then trains params.yaml's
model on each with one Ray Train worker for --steps steps. Prints each split's size decoded and as
compressed shards, the worker's peak RSS (its own report) and the driver's own memory (RssAnon) once
every shard is published. A worker that held the
split in memory would need at least the decoded size on top of its baseline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks import results
from benchmarks.throughput import benchmark_params
from gancore.images import from_uint8
from gancore.metrics.features import feature_reference
from gancore.models.classifier import Classifier
from pipelines.ray_runtime import put_shards
from pipelines.shards import encode_shards
from pipelines.stages.train import completed_state, fit

NUM_CLASSES = 10


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = np.broadcast_to(rng.integers(0, 256, (count, 1, 1, 3), dtype=np.uint8), (count, size, size, 3)).copy()
    corners = rng.integers(0, size // 2, (count, 2))
    colours = rng.integers(0, 256, (count, 3), dtype=np.uint8)
    for image, (row, col), colour in zip(images, corners, colours):
        image[row : row + size // 2, col : col + size // 2] = colour
    # Sensor-like noise, so that the shards compress about as much as photographs do, not to nothing.
    return images | rng.integers(0, 32, images.shape, dtype=np.uint8)


def synthetic_shards(images: int, size: int, shard_size: int):
    """(.npz bytes, count) per shard, generated one shard at a time: the driver never holds the split."""
    for number, start in enumerate(range(0, images, shard_size)):
        count = min(shard_size, images - start)
        labels = np.arange(start, start + count, dtype=np.int64) % NUM_CLASSES
        yield from encode_shards(synthetic_images(count, size, seed=number), labels, shard_size)


def tallied(shards, sizes: list[int]):
    """The shards unchanged, with each one's size in bytes appended to `sizes` as it passes."""
    for content, count in shards:
        sizes.append(len(content))
        yield content, count


def measure(images: int, args, storage: str) -> dict:
    params = benchmark_params(1, args.batch_size, args.steps, storage)
    shape = {"channels": 3, "image_size": args.image_size, "num_classes": NUM_CLASSES}
    sizes: list[int] = []
    shards = put_shards(tallied(synthetic_shards(images, args.image_size, args.shard_size), sizes))
    stored = sum(sizes)
    # Anonymous memory only: the object-store pages the driver wrote are shared memory (RssShmem), not its own.
    status = Path("/proc/self/status").read_text().splitlines()
    driver_private = next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
    torch.manual_seed(0)
    classifier = Classifier(3, args.image_size, NUM_CLASSES, params.featurenet.feature_dim).eval()
    reference = ray.put(feature_reference(classifier, from_uint8(synthetic_images(500, args.image_size, seed=10**6)),
                                          np.arange(500, dtype=np.int64) % NUM_CLASSES))
    result = fit(params, shards, reference, shape, params.train.optimizer(), f"stream-{images}")
    history = completed_state(result)["history"]
    del shards  # the split leaves the object store before the next one comes in
    return {"images": images, "decoded_mb": images * args.image_size**2 * 3 / 2**20, "stored_mb": stored / 2**20,
            "worker_peak_mb": max(report["peak_rss_mb"] for report in history),
            "driver_private_mb": driver_private / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="images of the larger split")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="enough to cross several shards")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=1, logging_level="WARNING", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    rows = []
    with tempfile.TemporaryDirectory(prefix="stream-memory-") as storage:
        for images in (args.images // 10, args.images):
            rows.append(measure(images, args, storage))
    ray.shutdown()
    report = results.Report()
    report.line(f"{args.image_size}x{args.image_size}x3 images, shards of {args.shard_size}, 1 worker x batch "
                f"{args.batch_size}, {args.steps} steps\n")
    report.line("| train split | decoded pixels (MB) | shards in the object store (MB) | worker peak RSS (MB) |"
                " driver private memory after publishing (MB) |")
    report.line("|---:|---:|---:|---:|---:|")
    for row in rows:
        report.line(f"| {row['images']:,} | {row['decoded_mb']:,.0f} | {row['stored_mb']:,.0f} | "
                    f"{row['worker_peak_mb']:,.0f} | {row['driver_private_mb']:,.0f} |")
    small, large = rows
    growth = large["worker_peak_mb"] / small["worker_peak_mb"]
    report.line(f"\nworker peak RSS, {large['images']:,} / {small['images']:,} images: {growth:.2f}x for "
                f"{large['images'] / small['images']:.0f}x the data")
    report.save("stream-memory", {"rows": rows, "worker_peak_growth": growth},
                spread="one run per split size (peak RSS is a high-water mark)")

if __name__ == "__main__":
    main()
