"""Reading the output of stage `prepare` in later stages, with its checksums verified."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

Split = Literal["train", "test"]


class DatasetError(RuntimeError):
    """The prepared data is missing or does not match its manifest."""


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; run `dvc repro prepare` (or `dvc pull`) first")
    return json.loads(path.read_text())


def load_split(root: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int64 (N,)) of one split, shards in manifest order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    manifest = read_manifest(root)
    images, labels = [], []
    for shard in manifest["shards"]:
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
        with np.load(io.BytesIO(content)) as arrays:
            images.append(arrays["images"])
            labels.append(arrays["labels"])
    if not images:
        size, channels = manifest["image_size"], manifest["channels"]
        return np.zeros((0, size, size, channels), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.concatenate(images), np.concatenate(labels)


def training_set(root: Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The train split as dict(images, labels), and the shape a model needs: channels, image_size, num_classes."""
    manifest = read_manifest(root)
    images, labels = load_split(root, "train")
    shape = {"channels": manifest["channels"], "image_size": manifest["image_size"],
             "num_classes": len(manifest["class_names"])}
    return {"images": images, "labels": labels}, shape
