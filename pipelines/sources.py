"""What one source object holds, as images of the prepared shape, or the reason each is rejected.

An object is an image file (PNG, JPEG or WebP), a tar shard of images (the WebDataset
convention: members sharing a name up to the first dot form a sample, `.cls` holds its
integer class), or an `.npz` archive (`images` with optional `labels`, or `x`/`y`,
`x_train`/`y_train`...). Every image is composited over data.background where it is transparent,
converted to grayscale or RGB, centre-cropped to a square and resized with a PIL antialiased filter.

Memory per object is bounded by what the object declares, checked before the bytes are read
(ImageShape.read_limit): an image object or a tar member is read whole only up to one image's
worth of bytes, an .npz array row by row only when its header's image size is within
data.max_image_pixels, and compressed data only in formats whose expansion per read is bounded.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageChops, ImageColor, UnidentifiedImageError

from pipelines.config import DataParams
from pipelines.storage import StoredObject

IMAGE_FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}  # MPO: the multi-picture JPEG phones write
IMAGE_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}  # 8-bit grayscale or colour, with or without alpha
ALPHA_MODES = {"LA", "RGBA"}  # with an alpha band; the other modes may name a transparent colour or palette entries
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "webp"}
ARRAY_CHANNELS = (1, 3, 4)
MAX_BYTES_PER_PIXEL = 8  # 16-bit RGBA: the widest pixel of a file PIL opens in an accepted mode
METADATA_BYTES = 1 << 20  # what an image file may add to its pixels: headers, metadata chunks, compression overhead
TAR_HEADER_TYPES = (  # members tarfile reads whole itself: pax headers and GNU long names
    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK
)
GZIP_MAGIC = b"\x1f\x8b"
UNBOUNDED_MAGICS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
ARRAY_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what np.savez and np.savez_compressed write
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
    background: str  # a colour name PIL knows (data.background: white or black), shown where images are transparent

    @classmethod
    def of(cls, data: DataParams) -> ImageShape:
        return cls(data.image_size, data.channels, Image.Resampling[data.resize_filter.upper()], data.max_image_pixels,
                   data.min_image_side, data.background)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def read_limit(self) -> int:
        """The most bytes read from an object in one piece: one image file's worth, MAX_BYTES_PER_PIXEL for each
        of data.max_image_pixels pixels plus METADATA_BYTES (about 200 MB at the default 25 Mpx). An image object or
        a tar member that declares more is rejected unread; an .npz row (at most 4 uint8 channels) stays under it
        once its declared image size is within data.max_image_pixels."""
        return self.max_pixels * MAX_BYTES_PER_PIXEL + METADATA_BYTES

    def too_large(self, what: str, size: int) -> str | None:
        """Why `what`, declaring `size` bytes, is rejected before it is read; None when it is not."""
        if size <= self.read_limit:
            return None
        return (
            f"too large: {what} declares {size} bytes, more than the {self.read_limit} one image may take "
            f"({MAX_BYTES_PER_PIXEL} x data.max_image_pixels + {METADATA_BYTES}); not read"
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
        square = self.flatten(image).resize(
            (self.size, self.size), self.resize_filter, box=(left, top, left + side, top + side)
        )
        return np.asarray(square, dtype=np.uint8).reshape(self.size, self.size, self.channels)

    def flatten(self, image: Image.Image) -> Image.Image:
        """The image in the prepared mode, composited over the background where it has an alpha band, a transparent
        colour (1, L or RGB with a tRNS colour key) or transparent palette entries (P with tRNS).

        Before resizing: files keep arbitrary colours under fully transparent pixels (often streaks smeared from the
        drawing to the border), which dropping alpha would show and the resize filter would blend into the edges."""
        if image.mode not in ALPHA_MODES and "transparency" not in image.info:
            return image.convert(self.mode)
        if image.mode not in ALPHA_MODES:
            image = image.convert("RGBA")  # PIL turns the colour key or palette alpha into an alpha band
        flat = image.convert(self.mode)
        # Paste weighs the fill by the mask, 255 - alpha: alpha 0 gives exactly the background whatever colour the
        # file stores there, alpha 255 exactly the image's colour, and alpha in between their blend (the "over"
        # operator). In grayscale the blend follows the luma conversion, which is linear, so the order is immaterial.
        flat.paste(ImageColor.getcolor(self.background, self.mode), mask=ImageChops.invert(image.getchannel("A")))
        return flat


def read_samples(stored: StoredObject, stream: IO[bytes], shape: ImageShape) -> Iterator[Sample]:
    """Every image in one object, each with its pixels or the reason it was rejected."""
    folder_label = stored.key.split("/", 1)[0] if "/" in stored.key else None
    name = stored.key.lower()
    too_large = shape.too_large("the object", stored.size)
    if stored.size == 0:
        yield Sample(stored.key, hashlib.sha256(b"").hexdigest(), folder_label, None, "empty object (0 bytes)")
    elif name.endswith(TAR_SUFFIXES):
        yield from _tar_samples(stored.key, stream, shape, folder_label)
    elif name.endswith(".npz"):
        yield from _npz_samples(stored.key, stream, shape, folder_label)
    elif too_large:  # read whole below; tar shards and .npz arrays are read piece by piece
        yield Sample(stored.key, None, folder_label, None, too_large)
    else:
        yield _image_sample(stored.key, stream.read(), shape, folder_label)


def _image_sample(key: str, content: bytes, shape: ImageShape, label: str | None) -> Sample:
    digest = hashlib.sha256(content).hexdigest()
    try:
        return Sample(key, digest, label, shape.decode(content))
    except Rejected as rejected:
        return Sample(key, digest, label, None, str(rejected))


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a pax or GNU long-name header over METADATA_BYTES: tarfile reads those whole, before it yields
    the member they describe. The archive stops there, as what follows cannot be named without it."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's hook for subclasses
        if self.type in TAR_HEADER_TYPES and self.size > METADATA_BYTES:
            raise tarfile.ReadError(
                f"{self.name}: a {self.size}-byte extended header, more than {METADATA_BYTES}; not read"
            )
        return super()._proc_member(archive)


def _tar_samples(key: str, stream: IO[bytes], shape: ImageShape, folder_label: str | None) -> Iterator[Sample]:
    read = 0
    try:
        # Stream mode: members are read in order and never all at once.
        with tarfile.open(fileobj=stream, mode=_tar_mode(stream), tarinfo=_BoundedTarInfo) as archive:
            for sample_name, members, too_large in _webdataset_samples(archive, shape):
                sample_key = f"{key}#{sample_name}"
                if too_large:
                    yield Sample(sample_key, None, folder_label, None, too_large)
                else:
                    yield _tar_sample(sample_key, members, shape, folder_label)
                read += 1
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as error:  # ValueError: bad sparse headers
        yield Sample(key, None, folder_label, None, f"corrupt tar archive after {read} samples: {error}")


def _tar_mode(stream: IO[bytes]) -> str:
    """Plain or gzip: tarfile inflates each 10 KiB it reads in one piece, which gzip expands at most ~1000-fold,
    while a few hundred bytes of bzip2 or xz can hold gigabytes."""
    magic = stream.read(6)
    stream.seek(0)
    for prefix, compression in UNBOUNDED_MAGICS.items():
        if magic.startswith(prefix):
            raise tarfile.ReadError(f"{compression}-compressed; only plain and gzip tar shards are read")
    return "r|gz" if magic.startswith(GZIP_MAGIC) else "r|"


def _webdataset_samples(
    archive: tarfile.TarFile, shape: ImageShape
) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(sample name, {extension: content}, why it is too large) for each run of members that share a name up to
    the first dot. A member that declares more than shape.read_limit bytes is not read: stream mode passes over
    its data in small reads, and its sample is rejected."""
    current, members, too_large = None, {}, None
    for member in archive:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, extension = base.partition(".")
        name = f"{folder}/{stem}" if folder else stem
        if name != current and current is not None:
            yield current, members, too_large
            members, too_large = {}, None
        current = name
        member_too_large = shape.too_large(f"member {member.name}", member.size)
        if member_too_large:
            too_large = too_large or member_too_large
        else:
            members[extension.lower()] = archive.extractfile(member).read()
    if current is not None:
        yield current, members, too_large


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
    """One sample per row, read row by row from the archive, labels too, so memory holds one image of the array.

    Only the headers are read before the checks: the array is rejected whole when its images declare more than
    data.max_image_pixels pixels, or a zip entry holds another size than its header declares."""
    with ExitStack() as entries:
        try:
            stream = entries.enter_context(_open_array(archive, member))
            dims, fortran_order, dtype = _array_header(stream)
            row_shape, axes = _row_layout(dims, fortran_order, dtype, shape.max_pixels)
            _check_entry_size(archive, member, stream.tell(), dims, dtype)
            next_label = _label_reader(archive, labels_member, dims[0], entries) if labels_member else None
        except Rejected as rejected:
            yield Sample(key, None, folder_label, None, str(rejected))
            return
        row_bytes = math.prod(row_shape)
        for row in range(dims[0]):
            content = _read_exactly(stream, row_bytes, f"{member} ends at row {row} of {dims[0]}")
            sample_key = f"{key}[{row}]"
            digest = hashlib.sha256(f"{dtype.str} {dims[1:]}\n".encode() + content).hexdigest()
            label_number = next_label() if next_label else None
            if label_number is not None and label_number < 0:
                yield Sample(sample_key, digest, None, None, f"unreadable label {label_number}")
                continue
            label = folder_label if label_number is None else str(label_number)
            pixels = np.frombuffer(content, np.uint8).reshape(row_shape).transpose(axes)
            try:
                image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
                yield Sample(sample_key, digest, label, shape.normalise(image))
            except Rejected as rejected:
                yield Sample(sample_key, digest, label, None, str(rejected))


def _open_array(archive: zipfile.ZipFile, member: str) -> IO[bytes]:
    """The member as a stream; zipfile inflates bzip2 and lzma entries without bound, so those are not opened."""
    compression = archive.getinfo(member).compress_type
    if compression not in ARRAY_COMPRESSIONS:
        raise Rejected(f"{member} has zip compression method {compression}; only stored or deflated arrays are read")
    return archive.open(member)


def _array_header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) from the .npy header alone; the caller checks them before reading data."""
    version = np.lib.format.read_magic(stream)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    dims, fortran_order, dtype = header(stream)
    if any(side < 0 for side in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return dims, fortran_order, dtype


def _check_entry_size(
    archive: zipfile.ZipFile, member: str, header_bytes: int, dims: tuple[int, ...], dtype: np.dtype
) -> None:
    """The zip entry's size (ZipInfo.file_size, known before inflating) must be what the .npy header declares:
    a shorter entry is a cut-off array, caught before any of its rows is accepted."""
    declared = header_bytes + math.prod(dims) * dtype.itemsize
    entry_size = archive.getinfo(member).file_size
    if entry_size != declared:
        raise Rejected(
            f"corrupt array: {member} declares shape {dims} of {dtype} ({declared} bytes with its header), "
            f"but its zip entry holds {entry_size}"
        )


def _row_layout(
    dims: tuple[int, ...], fortran_order: bool, dtype: np.dtype, max_pixels: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How one row of an NHW, NHWC or NCHW uint8 array becomes (H, W, C): its shape, then the axis order.

    Refuses, from the header alone, any dtype but uint8 (so object arrays are never unpickled) and images of
    more than max_pixels pixels."""
    if dtype != np.uint8 or fortran_order:
        raise Rejected(f"pixels are {dtype}{' in Fortran order' if fortran_order else ''}; expected C-ordered uint8")
    if len(dims) == 3:
        row_shape, axes = (*dims[1:], 1), (0, 1, 2)
    elif len(dims) == 4 and dims[3] in ARRAY_CHANNELS:
        row_shape, axes = dims[1:], (0, 1, 2)
    elif len(dims) == 4 and dims[1] in ARRAY_CHANNELS:
        row_shape, axes = dims[1:], (1, 2, 0)
    else:
        raise Rejected(
            f"wrong channels: array of shape {dims}; "
            "expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1, 3 or 4"
        )
    height, width = row_shape[axes[0]], row_shape[axes[1]]
    if height * width > max_pixels:
        raise Rejected(
            f"absurd dimensions {width}x{height}: array of shape {dims} declares more pixels per image than "
            f"data.max_image_pixels ({max_pixels}); not read"
        )
    return row_shape, axes


def _label_reader(archive: zipfile.ZipFile, member: str, count: int, entries: ExitStack) -> Callable[[], int]:
    """Reads the labels one per call, beside the rows, after checking their header: never the whole array."""
    stream = entries.enter_context(_open_array(archive, member))
    dims, _, dtype = _array_header(stream)
    if dims != (count,) or not np.issubdtype(dtype, np.integer):
        raise Rejected(f"unreadable labels: {member} holds {dtype} of shape {dims}, expected {count} integers")
    _check_entry_size(archive, member, stream.tell(), dims, dtype)
    return lambda: int(np.frombuffer(_read_exactly(stream, dtype.itemsize, f"{member} ends early"), dtype)[0])


def _read_exactly(stream: IO[bytes], size: int, problem: str) -> bytes:
    content = stream.read(size)
    if len(content) < size:
        raise EOFError(problem)
    return content
