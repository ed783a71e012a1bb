"""Stage `prepare`: S3 (or local) images -> validated, resized, split, sharded arrays.

Reads `data.*` and the objects under `data.source` (image files, WebDataset tar shards,
.npz arrays: see pipelines/sources.py); writes `data/prepared/` (`<split>-NNNNN.npz`
shards + `manifest.json`) and `reports/data.json` (every rejected image and why). The
split and the shard contents depend only on image contents, `data.split_seed` and
`data.test_fraction`, never on listing order or object names.

Objects are listed, downloaded and decoded in parallel as a stream; accepted pixels wait
in a scratch file until the shards are cut, so memory holds the objects in flight
(2 x download_workers), SHARD_WRITERS shards, and a few hundred bytes of metadata per
image, whatever the dataset's size.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipelines.artifacts import DATA_REPORT_FILE, PREPARED_DIR
from pipelines.config import ConfigError, DataParams, load_params
from pipelines.shards import PixelSpill, write_npz
from pipelines.sources import ImageShape, Sample, read_samples
from pipelines.storage import (
    StorageError,
    StoredObject,
    atomic_directory,
    iter_objects,
    open_object,
    parallel_unordered,
    sha256_file,
    write_json_atomic,
)

CROP = "centre"
SPLITS = ("train", "test")
SHARD_WRITERS = 4  # deflate is the slow part of writing; each writer holds one shard in memory
UNLABELLED = -1


class DataQualityError(RuntimeError):
    """Too many unusable images (or one, with data.on_error: fail); the data report lists each and why."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """An accepted image: everything but its pixels, which wait in the spill at `record`."""

    source: StoredObject
    key: str
    sha256: str
    label: str | None
    record: int


@dataclass(frozen=True, slots=True)
class Example:
    image: Accepted
    label: int
    split: str


def split_of(content_sha256: str, split_seed: int, test_fraction: float) -> str:
    draw = int(hashlib.sha256(f"{content_sha256}{split_seed}".encode()).hexdigest()[:8], 16) / 2**32
    return "test" if draw < test_fraction else "train"


def prepare(data: DataParams, out_dir: Path = PREPARED_DIR, report_path: Path = DATA_REPORT_FILE) -> dict[str, Any]:
    """Run the stage on `data`; return the manifest written to `out_dir/manifest.json`."""
    shape = ImageShape.of(data)
    with atomic_directory(out_dir) as staging:
        spill = PixelSpill(staging / ".pixels", (data.image_size, data.image_size, data.channels))
        try:
            reading = _Reading(data, report_path)
            reading.read_all(shape, spill)
            images = reading.finish()
            class_names = sorted({image.label for image in images if image.label is not None}, key=_natural)
            label_of = {name: number for number, name in enumerate(class_names)} | {None: UNLABELLED}
            examples = [
                Example(
                    image=image,
                    label=label_of[image.label],
                    split=split_of(image.sha256, data.split_seed, data.test_fraction),
                )
                for image in images
            ]
            shards = _write_shards(examples, spill, data.shard_size, staging)
        finally:
            spill.close()
        manifest = _manifest(data, class_names, examples, shards, len(reading.rejects))
        write_json_atomic(staging / "manifest.json", manifest)
    return manifest


class _Reading:
    """Collects what the objects hold: accepted images deduplicated by content, rejects with reasons."""

    def __init__(self, data: DataParams, report_path: Path) -> None:
        self.data = data
        self.report_path = report_path
        self.listed = 0
        self.kept: dict[str, Accepted] = {}  # by sha256: of identical images, the one with the smallest key
        self.rejects: list[dict[str, str]] = []

    def read_all(self, shape: ImageShape, spill: PixelSpill) -> None:
        def read(stored: StoredObject) -> list[Accepted | dict[str, str]]:
            with open_object(stored) as stream:
                return [_spilled(stored, sample, spill) for sample in read_samples(stored, stream, shape)]

        # closing(): a failure stops the downloads in flight before the spill is closed.
        reads = closing(parallel_unordered(read, iter_objects(self.data.source), self.data.download_workers))
        with reads as results_per_object, tqdm(unit="obj", desc="read", mininterval=2) as progress:
            for results in results_per_object:
                self.listed += 1
                progress.update()
                for result in results:
                    if isinstance(result, Accepted):
                        self._keep(result)
                    else:
                        self._reject(result["key"], result["reason"])
        if not self.listed:
            raise StorageError(f"{self.data.source}: no objects found; check data.source in params.yaml")

    def finish(self) -> list[Accepted]:
        """The accepted images after the label rule; writes the report and enforces the rejection limit."""
        if any(image.label is not None for image in self.kept.values()):
            for image in [image for image in self.kept.values() if image.label is None]:
                del self.kept[image.sha256]
                self._reject(image.key, "no label: not in a class folder and no label of its own, unlike the others")
        self._write_report()
        total = len(self.kept) + len(self.rejects)
        if not self.kept or len(self.rejects) > self.data.max_rejected_fraction * total:
            raise DataQualityError(
                f"{len(self.rejects)} of {total} images under {self.data.source} were rejected, leaving "
                f"{len(self.kept)} usable (data.max_rejected_fraction is {self.data.max_rejected_fraction}); "
                f"see {self.report_path} for each key and reason"
            )
        return sorted(self.kept.values(), key=lambda image: image.key)

    def _keep(self, image: Accepted) -> None:
        first = self.kept.setdefault(image.sha256, image)
        if first is not image:
            kept, dropped = sorted((first, image), key=lambda candidate: candidate.key)
            self.kept[image.sha256] = kept
            self._reject(dropped.key, f"duplicate of {kept.key}")

    def _reject(self, key: str, reason: str) -> None:
        self.rejects.append({"key": key, "reason": reason})
        if self.data.on_error == "fail":
            self._write_report()
            raise DataQualityError(
                f"{key} under {self.data.source}: {reason} (data.on_error is fail); see {self.report_path}"
            )

    def _write_report(self) -> None:
        report = {
            "source": self.data.source,
            "listed": self.listed,
            "accepted": len(self.kept),
            "rejected": len(self.rejects),
            "rejects": sorted(self.rejects, key=lambda reject: reject["key"]),
        }
        write_json_atomic(self.report_path, report)


def _spilled(stored: StoredObject, sample: Sample, spill: PixelSpill) -> Accepted | dict[str, str]:
    if sample.pixels is None:
        return {"key": sample.key, "reason": sample.problem}
    return Accepted(stored, sample.key, sample.sha256, sample.label, spill.append(sample.pixels))


def _natural(name: str) -> tuple[int, int, str]:
    """Class names in natural order: 2 before 10 (WebDataset and .npz labels are numbers)."""
    return (0, int(name), "") if re.fullmatch(r"\d+", name) else (1, 0, name)


def _write_shards(examples: list[Example], spill: PixelSpill, shard_size: int, folder: Path) -> list[dict[str, Any]]:
    """Each split's images in sha256 order, cut every shard_size; SHARD_WRITERS shards are compressed at once."""
    jobs = []
    for split in SPLITS:
        members = sorted((e for e in examples if e.split == split), key=lambda example: example.image.sha256)
        for number, start in enumerate(range(0, len(members), shard_size)):
            jobs.append((folder / f"{split}-{number:05d}.npz", split, members[start : start + shard_size]))

    def write(job: tuple[Path, str, list[Example]]) -> dict[str, Any]:
        path, split, chunk = job
        write_npz(
            path,
            images=spill.read([example.image.record for example in chunk]),
            labels=np.array([example.label for example in chunk], dtype=np.int64),
        )
        return {"file": path.name, "split": split, "count": len(chunk), "sha256": sha256_file(path)}

    with ThreadPoolExecutor(SHARD_WRITERS) as pool:  # zlib and sha256 release the GIL
        return list(pool.map(write, jobs))


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
        "background": data.background,
        "resize_filter": ImageShape.of(data).resize_filter.name,
        "crop": CROP,
        "test_fraction": data.test_fraction,
        "split_seed": data.split_seed,
        "class_names": class_names,
        "counts": {split: sum(per_class[split].values()) for split in SPLITS} | {"rejected": rejected},
        "class_counts": {split: dict(sorted(per_class[split].items())) for split in SPLITS},
        "shards": shards,
        "objects": [
            {
                "key": e.image.key,
                "etag": e.image.source.etag,
                "version_id": e.image.source.version_id,
                "sha256": e.image.sha256,
                "split": e.split,
                "label": e.label,
            }
            for e in examples
        ],
        "dataset_hash": _dataset_hash(data, examples),
    }


def _dataset_hash(data: DataParams, examples: list[Example]) -> str:
    """Identifies the prepared arrays: contents, labels, split and shape, but not object names."""
    filter_name = ImageShape.of(data).resize_filter.name
    shape = (f"image_size={data.image_size} channels={data.channels} filter={filter_name} crop={CROP}"
             f" background={data.background}\n")
    digest = hashlib.sha256(shape.encode())
    for example in sorted(examples, key=lambda example: example.image.sha256):
        digest.update(f"{example.image.sha256} {example.split} {example.label}\n".encode())
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
        f"(see {DATA_REPORT_FILE}); dataset_hash {manifest['dataset_hash'][:12]}"
    )


if __name__ == "__main__":
    main()
