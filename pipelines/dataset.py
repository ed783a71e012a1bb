"""Reading the output of stage `prepare` in later stages, shard by shard, with its checksums verified.

Training streams the train split: `ShardedBatches` gives each worker its batches while holding only
the shards the current batch touches, so a dataset larger than RAM trains in bounded memory.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.errors import UserError

Split = Literal["train", "test"]
Shard = tuple[np.ndarray, np.ndarray]  # images uint8 (N, H, W, C), labels int64 (N,)


class DatasetError(UserError):
    """The prepared data is missing or does not match its manifest."""


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; run `dvc repro prepare` (or `dvc pull`) first")
    return json.loads(path.read_text())


def model_shape(manifest: dict[str, Any]) -> dict[str, int]:
    """What a model needs to know about the data: channels, image_size, num_classes."""
    return {"channels": manifest["channels"], "image_size": manifest["image_size"],
            "num_classes": len(manifest["class_names"])}


def decode_shard(content: bytes) -> Shard:
    with np.load(io.BytesIO(content)) as arrays:
        return arrays["images"], arrays["labels"]


def shard_files(root: Path, split: Split) -> Iterator[tuple[bytes, int]]:
    """(.npz bytes, image count) of each shard of `split`, in manifest order, each checked against its sha256."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    for shard in read_manifest(root)["shards"]:
        if shard["split"] != split:
            continue
        path = root / shard["file"]
        if not path.is_file():
            raise DatasetError(
                f"{path}: shard listed in the manifest is missing; run `dvc pull` or `dvc repro prepare`"
            )
        content = path.read_bytes()
        if hashlib.sha256(content).hexdigest() != shard["sha256"]:
            raise DatasetError(
                f"{path}: sha256 differs from {root / 'manifest.json'}, so the shard is corrupt or stale; "
                "run `dvc repro prepare` (or `dvc pull`) to restore it"
            )
        yield content, shard["count"]


def load_split(root: Path, split: Split, limit: int | None = None) -> Shard:
    """The images and labels of one split, shards in manifest order; with `limit`, only the first shards
    that hold that many images. Prepare cuts shards in content-hash order, so those are a uniform sample."""
    images, labels, total = [], [], 0
    for content, count in shard_files(root, split):
        shard_images, shard_labels = decode_shard(content)
        images.append(shard_images)
        labels.append(shard_labels)
        total += count
        if limit is not None and total >= limit:
            break  # before the next shard is read
    if not images:
        manifest = read_manifest(root)
        size, channels = manifest["image_size"], manifest["channels"]
        return np.zeros((0, size, size, channels), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


class ShardedBatches:
    """One worker's batches of a sharded split, read shard by shard.

    An epoch orders the shards by a seeded permutation and the images inside each shard by another;
    worker `rank` takes the rank-th contiguous 1/world_size of that order. So each worker reads only
    its share of the shards per epoch, every image is seen once per epoch across the workers, and a
    batch is a pure function of (seed, step, rank, world_size): a restored run continues with exactly
    the batches it would have seen. Memory holds the shards the current batch spans (usually one).
    Prepare cuts shards in content-hash order, so a batch from one shard is a uniform sample.
    """

    def __init__(self, counts: list[int], load_shard: Callable[[int], Shard], batch_size: int, seed: int,
                 rank: int, world_size: int) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.load_shard, self.batch_size, self.seed = load_shard, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_worker = int(self.counts.sum()) // world_size
        self.steps_per_epoch = self.per_worker // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{int(self.counts.sum())} training images cannot fill one batch of {batch_size} on each of "
                f"{world_size} workers; lower train.batch_size or train.num_workers"
            )
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, shard order, start of each)
        self._loaded: dict[int, Shard] = {}

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._layout is None or self._layout[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
            starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
            self._layout = (epoch, order, starts)
        return self._layout[1], self._layout[2]

    def batch(self, step: int) -> Shard:
        epoch, position = divmod(step, self.steps_per_epoch)
        order, starts = self._epoch_layout(epoch)
        first = self.rank * self.per_worker + position * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        slots = np.searchsorted(starts, positions, side="right") - 1
        images, labels, loaded = [], [], {}
        for slot in np.unique(slots):
            shard = int(order[slot])
            shard_images, shard_labels = loaded[shard] = self._loaded.get(shard) or self.load_shard(shard)
            within = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.counts[shard]))
            take = within[positions[slots == slot] - starts[slot]]
            images.append(shard_images[take])
            labels.append(shard_labels[take])
        self._loaded = loaded  # shards this batch no longer needs are released
        return np.concatenate(images), np.concatenate(labels)
