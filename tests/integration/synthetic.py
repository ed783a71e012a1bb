"""Small synthetic datasets in every source format prepare reads, built in memory."""

from __future__ import annotations

import io
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from conftest import REPO
from PIL import Image

from pipelines.config import DataParams
from pipelines.dataset import load_split
from pipelines.storage import s3_client

REPO_PARAMS = REPO / "params.yaml"


def pixels_by_key(manifest: dict, out_dir: Path) -> dict[str, np.ndarray]:
    """Each accepted key's prepared pixels: shards hold images in sha256 order, split by split."""
    by_sha = {}
    for split in ("train", "test"):
        images, _ = load_split(out_dir, split)
        members = sorted((o for o in manifest["objects"] if o["split"] == split), key=lambda o: o["sha256"])
        by_sha |= {member["sha256"]: image for member, image in zip(members, images, strict=True)}
    return {item["key"]: by_sha[item["sha256"]] for item in manifest["objects"]}


def data_params(source: str, **overrides: Any) -> DataParams:
    """The repository's data section with small images and shards; tolerant of rejects unless told."""
    small = {"source": source, "image_size": 16, "shard_size": 128, "download_workers": 8}
    values = yaml.safe_load(REPO_PARAMS.read_text())["data"] | small | {"max_rejected_fraction": 0.5}
    return DataParams(**(values | overrides))


def noise(seed: int, shape: tuple[int, ...] = (20, 20)) -> np.ndarray:
    """Random uint8 pixels: every seed gives a different image, hence a different content hash."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image | np.ndarray, image_format: str = "PNG", **options: Any) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header says width x height (what a decompression bomb looks like)."""
    content = bytearray(encode(noise(0, (8, 8))))
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes(content[24:29])
    content[12:29] = header
    content[29:33] = zlib.crc32(header).to_bytes(4, "big")
    return bytes(content)


def tar_shard(members: dict[str, bytes]) -> bytes:
    """A tar of the members in the given order (WebDataset: members of a sample are adjacent)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def upload(uri: str, files: dict[str, bytes]) -> None:
    """Put each file under the s3:// prefix `uri`, in parallel."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_client()
    with ThreadPoolExecutor(8) as pool:
        puts = [pool.submit(client.put_object, Bucket=bucket, Key=f"{prefix}/{key}", Body=body)
                for key, body in files.items()]
        for put in puts:
            put.result()


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for key, body in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(body)
    return root
