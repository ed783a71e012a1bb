"""Stage `prepare`: S3 (or local) images -> validated, resized, split, sharded arrays.

Reads `data.*` and the objects under `data.source`; writes `data/prepared/`
(`<split>-NNNNN.npz` shards + `manifest.json`) and `reports/data.json` (every rejected
object and why). The split and the shard contents depend only on image contents,
`data.split_seed` and `data.test_fraction`, never on listing order or object names.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipelines.config import ConfigError, DataParams, load_params
from pipelines.storage import (
    StorageError,
    StoredObject,
    atomic_directory,
    list_objects,
    read_bytes,
    sha256_file,
    write_json_atomic,
)

PREPARED_DIR = Path("data/prepared")
REPORT_PATH = Path("reports/data.json")
RESIZE_FILTER = Image.Resampling.LANCZOS
PIL_MODES = {1: "L", 3: "RGB"}
SPLITS = ("train", "test")
UNLABELLED = -1


class DataQualityError(RuntimeError):
    """Too few usable images; the data report lists each rejected object."""


@dataclass(frozen=True)
class Fetched:
    stored: StoredObject
    sha256: str
    pixels: np.ndarray | None  # (H, W, C) uint8, None when rejected
    problem: str | None


@dataclass(frozen=True)
class Example:
    stored: StoredObject
    sha256: str
    pixels: np.ndarray
    label: int
    split: str


def split_of(content_sha256: str, split_seed: int, test_fraction: float) -> str:
    draw = int(hashlib.sha256(f"{content_sha256}{split_seed}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if draw < test_fraction else "train"


def prepare(data: DataParams, out_dir: Path = PREPARED_DIR, report_path: Path = REPORT_PATH) -> dict[str, Any]:
    """Run the stage on `data`; return the manifest written to `out_dir/manifest.json`."""
    objects = list_objects(data.source)
    class_names = sorted({stored.key.split("/", 1)[0] for stored in objects if "/" in stored.key})
    fetched = _fetch_all(objects, data)

    examples: list[Example] = []
    rejects: list[dict[str, str]] = []
    first_key_of: dict[str, str] = {}
    for item in fetched:  # key order, so the first copy of a duplicate is the one kept
        if item.problem is not None:
            rejects.append({"key": item.stored.key, "reason": item.problem})
        elif item.sha256 in first_key_of:
            rejects.append({"key": item.stored.key, "reason": f"duplicate of {first_key_of[item.sha256]}"})
        else:
            first_key_of[item.sha256] = item.stored.key
            examples.append(
                Example(
                    stored=item.stored,
                    sha256=item.sha256,
                    pixels=item.pixels,
                    label=_label(item.stored.key, class_names),
                    split=split_of(item.sha256, data.split_seed, data.test_fraction),
                )
            )

    report = {
        "source": data.source,
        "listed": len(objects),
        "accepted": len(examples),
        "rejected": len(rejects),
        "rejects": rejects,
    }
    write_json_atomic(report_path, report)
    if not examples or 2 * len(rejects) > len(objects):
        raise DataQualityError(
            f"{len(rejects)} of {len(objects)} objects under {data.source} were rejected, leaving "
            f"{len(examples)} usable images; see {report_path} for each key and reason"
        )

    with atomic_directory(out_dir) as staging:
        shards = _write_shards(examples, data.shard_size, staging)
        manifest = _manifest(data, class_names, examples, shards, len(rejects))
        write_json_atomic(staging / "manifest.json", manifest)
    return manifest


def _fetch_all(objects: list[StoredObject], data: DataParams) -> list[Fetched]:
    def fetch(stored: StoredObject) -> Fetched:
        return _decode(stored, read_bytes(stored.uri), data.image_size, PIL_MODES[data.channels])

    with ThreadPoolExecutor(data.download_workers) as pool:
        # map keeps listing order and cancels queued downloads if one raises
        return list(tqdm(pool.map(fetch, objects), total=len(objects), unit="obj", desc="download"))


def _decode(stored: StoredObject, content: bytes, size: int, mode: str) -> Fetched:
    digest = hashlib.sha256(content).hexdigest()
    if not content:
        return Fetched(stored, digest, None, "empty object (0 bytes)")
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            resized = image.convert(mode).resize((size, size), RESIZE_FILTER)
    except UnidentifiedImageError:
        return Fetched(stored, digest, None, "not an image format PIL can identify")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return Fetched(stored, digest, None, f"corrupt image: {error}")
    pixels = np.asarray(resized, dtype=np.uint8)
    return Fetched(stored, digest, pixels.reshape(size, size, -1), None)


def _label(key: str, class_names: list[str]) -> int:
    return class_names.index(key.split("/", 1)[0]) if "/" in key else UNLABELLED


def _write_shards(examples: list[Example], shard_size: int, folder: Path) -> list[dict[str, Any]]:
    shards = []
    for split in SPLITS:
        members = sorted((e for e in examples if e.split == split), key=lambda example: example.sha256)
        for number, start in enumerate(range(0, len(members), shard_size)):
            chunk = members[start : start + shard_size]
            path = folder / f"{split}-{number:05d}.npz"
            _write_npz(
                path,
                images=np.stack([example.pixels for example in chunk]),
                labels=np.array([example.label for example in chunk], dtype=np.int64),
            )
            shards.append({"file": path.name, "split": split, "count": len(chunk), "sha256": sha256_file(path)})
    return shards


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, minus the wall-clock timestamps that would change the file's hash."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)


def _manifest(
    data: DataParams, class_names: list[str], examples: list[Example], shards: list[dict[str, Any]], rejected: int
) -> dict[str, Any]:
    def class_name(label: int) -> str:
        return "unlabelled" if label == UNLABELLED else class_names[label]

    per_class = {split: Counter(class_name(e.label) for e in examples if e.split == split) for split in SPLITS}
    return {
        "source": data.source,
        "image_size": data.image_size,
        "channels": data.channels,
        "resize_filter": RESIZE_FILTER.name,
        "test_fraction": data.test_fraction,
        "split_seed": data.split_seed,
        "class_names": class_names,
        "counts": {split: sum(per_class[split].values()) for split in SPLITS} | {"rejected": rejected},
        "class_counts": {split: dict(sorted(per_class[split].items())) for split in SPLITS},
        "shards": shards,
        "objects": [
            {"key": e.stored.key, "etag": e.stored.etag, "sha256": e.sha256, "split": e.split, "label": e.label}
            for e in examples
        ],
        "dataset_hash": _dataset_hash(data, examples),
    }


def _dataset_hash(data: DataParams, examples: list[Example]) -> str:
    """Identifies the prepared arrays: contents, labels, split and shape, but not object names."""
    shape = f"image_size={data.image_size} channels={data.channels} filter={RESIZE_FILTER.name}\n"
    digest = hashlib.sha256(shape.encode())
    for example in sorted(examples, key=lambda example: example.sha256):
        digest.update(f"{example.sha256} {example.split} {example.label}\n".encode())
    return digest.hexdigest()


def main() -> None:
    try:
        manifest = prepare(load_params().data)
    except (ConfigError, StorageError) as error:
        print(f"prepare: {error}", file=sys.stderr)
        sys.exit(2)
    except DataQualityError as error:
        print(f"prepare: {error}", file=sys.stderr)
        sys.exit(1)
    counts = manifest["counts"]
    size, channels = manifest["image_size"], manifest["channels"]
    print(
        f"prepare: {counts['train']} train + {counts['test']} test images ({size}x{size}x{channels}, "
        f"{len(manifest['class_names'])} classes) from {manifest['source']}; {counts['rejected']} rejected "
        f"(see {REPORT_PATH}); dataset_hash {manifest['dataset_hash'][:12]}"
    )


if __name__ == "__main__":
    main()
