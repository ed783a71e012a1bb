"""The prepared shards: `<split>-NNNNN.npz` files of images and labels, written byte-for-byte reproducibly.

Pixels of accepted images wait in a scratch file (`PixelSpill`) until every object is
read, so the shards can be cut in content-hash order while memory holds one shard.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np


class PixelSpill:
    """Fixed-size uint8 images appended to a scratch file from any thread and read back by record number."""

    def __init__(self, path: Path, shape: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.shape = shape
        self._record_bytes = int(np.prod(shape))
        self._file = self.path.open("w+b")
        self._lock = threading.Lock()
        self._count = 0

    def append(self, pixels: np.ndarray) -> int:
        content = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        if len(content) != self._record_bytes:
            raise ValueError(f"pixels of shape {pixels.shape}, expected {self.shape}")
        with self._lock:
            self._file.write(content)
            record, self._count = self._count, self._count + 1
        return record

    def read(self, records: list[int]) -> np.ndarray:
        """(len(records), *shape) uint8. Plain reads, not mmap: mapped pages would count in RSS."""
        self._file.flush()
        size, descriptor = self._record_bytes, self._file.fileno()
        content = b"".join(os.pread(descriptor, size, record * size) for record in records)
        return np.frombuffer(content, dtype=np.uint8).reshape(len(records), *self.shape)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def write_npz(path: Path | BinaryIO, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, minus the wall-clock timestamps that would change the file's hash."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)


def encode_shards(images: np.ndarray, labels: np.ndarray, shard_size: int) -> Iterator[tuple[bytes, int]]:
    """(.npz bytes, count) of in-memory arrays cut into shards: what `dataset.shard_files` yields from disk."""
    for start in range(0, len(images), shard_size):
        chunk = slice(start, start + shard_size)
        buffer = io.BytesIO()
        write_npz(buffer, images=images[chunk], labels=labels[chunk])
        yield buffer.getvalue(), len(images[chunk])
