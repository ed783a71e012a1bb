"""What one source object holds, as images of the prepared shape, or the reason each is rejected.

An object is an image file (PNG, JPEG or WebP), a tar shard of images (the WebDataset
convention: members sharing a name up to the first dot form a sample, `.cls` holds its
integer class), or an `.npz` archive (`images` with optional `labels`, or `x`/`y`,
`x_train`/`y_train`...). Every image is centre-cropped to a square, resized with a PIL
antialiased filter and converted to grayscale or RGB (alpha dropped).
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.config import DataParams
from pipelines.storage import StoredObject

RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
IMAGE_FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}  # MPO: the multi-picture JPEG phones write
IMAGE_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}  # 8-bit grayscale or colour, with or without alpha
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "webp"}
ARRAY_CHANNELS = (1, 3, 4)
# What PIL's parsers and decoders raise on malformed files: mostly OSError, but not only.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)


class Rejected(ValueError):
    """The image cannot be used; the message is the reason the data report gives."""


@dataclass(frozen=True)
class Sample:
    key: str  # the object's key, plus '#name' for a tar sample or '#array[row]' for an .npz row
    sha256: str | None  # of the image's bytes (an .npz row: dtype, shape and raw pixels)
    label: str | None  # class name; None when neither the sample nor a class folder gives one
    pixels: np.ndarray | None  # (size, size, channels) uint8; None when rejected
    problem: str | None = None


@dataclass(frozen=True)
class ImageShape:
    size: int
    channels: int
    resize_filter: Image.Resampling
    max_pixels: int
    min_side: int

    @classmethod
    def of(cls, data: DataParams) -> ImageShape:
        return cls(
            data.image_size, data.channels, RESIZE_FILTERS[data.resize_filter], data.max_image_pixels, data.min_image_side
        )

    def decode(self, content: bytes) -> np.ndarray:
        if not content:
            raise Rejected("empty object (0 bytes)")
        try:
            image = Image.open(io.BytesIO(content))
        except UnidentifiedImageError:
            raise Rejected("not an image format PIL can identify") from None
        except Image.DecompressionBombError as error:
            raise Rejected(f"absurd dimensions: {error}") from None
        except DECODE_ERRORS as error:
            raise Rejected(f"corrupt image header: {error!r}") from None
        with image:
            if image.format not in IMAGE_FORMATS:
                raise Rejected(f"{image.format} image: only PNG, JPEG and WebP are read")
            return self.normalise(image)

    def normalise(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        if width * height > self.max_pixels:
            raise Rejected(f"absurd dimensions {width}x{height}: more than data.max_image_pixels ({self.max_pixels})")
        if min(width, height) < self.min_side:
            raise Rejected(f"absurd dimensions {width}x{height}: a side under data.min_image_side ({self.min_side})")
        if image.mode not in IMAGE_MODES:
            raise Rejected(
                f"wrong channels: pixel mode {image.mode} ({len(image.getbands())} channels), "
                "expected 8-bit grayscale or RGB, with or without alpha"
            )
        try:
            image.load()
        except DECODE_ERRORS as error:
            raise Rejected(f"corrupt image: {error}") from None
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = image.convert("L" if self.channels == 1 else "RGB").resize(
            (self.size, self.size), self.resize_filter, box=(left, top, left + side, top + side)
        )
        return np.asarray(square, dtype=np.uint8).reshape(self.size, self.size, self.channels)


def read_samples(stored: StoredObject, stream: IO[bytes], shape: ImageShape) -> Iterator[Sample]:
    """Every image in one object, each with its pixels or the reason it was rejected."""
    folder_label = stored.key.split("/", 1)[0] if "/" in stored.key else None
    name = stored.key.lower()
    if stored.size == 0:
        yield Sample(stored.key, hashlib.sha256(b"").hexdigest(), folder_label, None, "empty object (0 bytes)")
    elif name.endswith(TAR_SUFFIXES):
        yield from _tar_samples(stored.key, stream, shape, folder_label)
    elif name.endswith(".npz"):
        yield from _npz_samples(stored.key, stream, shape, folder_label)
    else:
        yield _image_sample(stored.key, stream.read(), shape, folder_label)


def _image_sample(key: str, content: bytes, shape: ImageShape, label: str | None) -> Sample:
    digest = hashlib.sha256(content).hexdigest()
    try:
        return Sample(key, digest, label, shape.decode(content))
    except Rejected as rejected:
        return Sample(key, digest, label, None, str(rejected))


def _tar_samples(key: str, stream: IO[bytes], shape: ImageShape, folder_label: str | None) -> Iterator[Sample]:
    read = 0
    try:
        # Stream mode: members are read in order and never all at once.
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for sample_name, members in _webdataset_samples(archive):
                yield _tar_sample(f"{key}#{sample_name}", members, shape, folder_label)
                read += 1
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        yield Sample(key, None, folder_label, None, f"corrupt tar archive after {read} samples: {error}")


def _webdataset_samples(archive: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(sample name, {extension: content}) for each run of members that share a name up to the first dot."""
    current, members = None, {}
    for member in archive:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, extension = base.partition(".")
        name = f"{folder}/{stem}" if folder else stem
        if name != current and members:
            yield current, members
            members = {}
        current = name
        members[extension.lower()] = archive.extractfile(member).read()
    if members:
        yield current, members


def _tar_sample(key: str, members: dict[str, bytes], shape: ImageShape, folder_label: str | None) -> Sample:
    images = sorted(TAR_IMAGE_EXTENSIONS & members.keys())
    if len(images) != 1:
        found = ", ".join(f".{extension}" for extension in sorted(members))
        return Sample(key, None, folder_label, None, f"expected one image in the sample, found {found}")
    label = folder_label
    if "cls" in members:
        text = members["cls"].decode(errors="replace").strip()
        if not (text.isascii() and text.isdigit()):
            return Sample(key, None, None, None, f"unreadable label in .cls: {text[:40]!r}")
        label = str(int(text))
    return _image_sample(key, members[images[0]], shape, label)


def _npz_samples(key: str, stream: IO[bytes], shape: ImageShape, folder_label: str | None) -> Iterator[Sample]:
    try:
        with zipfile.ZipFile(stream) as archive:
            arrays = {name.removesuffix(".npy"): name for name in archive.namelist() if name.endswith(".npy")}
            image_arrays = sorted(name for name in arrays if name in ("images", "x") or name.startswith("x_"))
            if not image_arrays:
                yield Sample(key, None, folder_label, None, "no image array in .npz ('images', 'x' or 'x_*')")
            for name in image_arrays:
                labels_name = "labels" if name == "images" else f"y{name[1:]}"
                labels = arrays.get(labels_name)
                yield from _array_samples(f"{key}#{name}", archive, arrays[name], labels, shape, folder_label)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as error:
        yield Sample(key, None, folder_label, None, f"corrupt .npz archive: {error}")


def _array_samples(
    key: str,
    archive: zipfile.ZipFile,
    member: str,
    labels_member: str | None,
    shape: ImageShape,
    folder_label: str | None,
) -> Iterator[Sample]:
    """One sample per row, read row by row from the archive, so memory holds one image of the array."""
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        dims, fortran_order, dtype = header(stream)
        try:
            row_shape, axes = _row_layout(dims, fortran_order, dtype)
            labels = _labels(archive, labels_member, dims[0]) if labels_member else None
        except Rejected as rejected:
            yield Sample(key, None, folder_label, None, str(rejected))
            return
        row_bytes = int(np.prod(row_shape))
        for row in range(dims[0]):
            content = stream.read(row_bytes)
            if len(content) < row_bytes:
                raise EOFError(f"{member} ends at row {row} of {dims[0]}")
            sample_key = f"{key}[{row}]"
            digest = hashlib.sha256(f"{dtype.str} {dims[1:]}\n".encode() + content).hexdigest()
            label = folder_label if labels is None else str(labels[row])
            if labels is not None and labels[row] < 0:
                yield Sample(sample_key, digest, None, None, f"unreadable label {labels[row]}")
                continue
            pixels = np.frombuffer(content, np.uint8).reshape(row_shape).transpose(axes)
            try:
                image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
                yield Sample(sample_key, digest, label, shape.normalise(image))
            except Rejected as rejected:
                yield Sample(sample_key, digest, label, None, str(rejected))


def _row_layout(dims: tuple[int, ...], fortran_order: bool, dtype: np.dtype) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How one row of an NHW, NHWC or NCHW uint8 array becomes (H, W, C): its shape, then the axis order."""
    if dtype != np.uint8 or fortran_order:
        raise Rejected(f"pixels are {dtype}{' in Fortran order' if fortran_order else ''}; expected C-ordered uint8")
    if len(dims) == 3:
        return (*dims[1:], 1), (0, 1, 2)
    if len(dims) == 4 and dims[3] in ARRAY_CHANNELS:
        return dims[1:], (0, 1, 2)
    if len(dims) == 4 and dims[1] in ARRAY_CHANNELS:
        return dims[1:], (1, 2, 0)
    raise Rejected(
        f"wrong channels: array of shape {dims}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1, 3 or 4"
    )


def _labels(archive: zipfile.ZipFile, member: str, count: int) -> np.ndarray:
    with archive.open(member) as stream:
        labels = np.lib.format.read_array(stream, allow_pickle=False)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise Rejected(
            f"unreadable labels: {member} holds {labels.dtype} of shape {labels.shape}, expected {count} integers"
        )
    return labels
