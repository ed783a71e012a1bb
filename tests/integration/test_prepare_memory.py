"""Stage prepare on objects that declare far more bytes than memory holds (an .npz array header, a tar member,
a tar extended header): each is rejected from what it declares, before any of it is read, in a process whose
address space could not hold it, and the rest of the data still prepares. An image object over the read limit is
rejected by its listed size."""

from __future__ import annotations

import bz2
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from synthetic import data_params, encode, noise, npz, tar_shard, write_folder

from pipelines.config import DataParams
from pipelines.stages.prepare import prepare
from pipelines.sources import METADATA_BYTES, ImageShape

HEADROOM = 2 << 30  # address space the child may add after its imports: less than any size declared below
SIDE = 60_000  # images.npy of shape (1, 60000, 60000): 3.6 GB of pixels
EXPANDED = 6 << 30  # what the tar bombs expand to

# Run in a child process: the limit applies to it alone, and a regression fails the test instead of the machine.
CHILD = """
import resource, sys
from pathlib import Path
from pipelines.config import DataParams
from pipelines.stages.prepare import DataQualityError, prepare

with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize:"))
limit = mapped + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    prepare(DataParams.model_validate_json(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
except DataQualityError as error:
    sys.exit(f"prepare: {error}")
"""


def deflated_zeros(prefix: bytes, count: int) -> bytes:
    """Raw deflate of `prefix` then `count` zero bytes, built in milliseconds: after a full flush deflate
    starts afresh, so one compressed MiB of zeros (about 1 KiB) can be repeated."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    mebibyte = deflate.compress(bytes(1 << 20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    mebibytes, rest = divmod(count, 1 << 20)
    return head + mebibyte * mebibytes + deflate.compress(bytes(rest)) + deflate.flush()


def npy_header(shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return header.getvalue()


def npz_bomb(side: int) -> bytes:
    """An .npz whose images.npy declares (1, side, side) uint8 and holds that many zeros, deflated to ~1/1000.

    Zipped by hand, as zipfile cannot store already-deflated bytes. Times, dates and the CRC are left 0: reading
    stops long before the CRC is checked."""
    header, name = npy_header((1, side, side)), b"images.npy"
    data = deflated_zeros(header, side * side)
    fields = (zipfile.ZIP_DEFLATED, 0, 0, 0, len(data), len(header) + side * side, len(name))
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, *fields, 0) + name
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, *fields, 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    return local + data + central + end


def tar_with_sparse_member(members: dict[str, bytes], sparse: str, size: int) -> bytes:
    """A tar of the members in order, `sparse` a GNU sparse file: its bytes, then a hole up to `size`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            if name == sparse:
                info.pax_headers = {"GNU.sparse.map": f"0,{len(content)}", "GNU.sparse.size": str(size)}
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def tgz_with_huge_extended_header(members: dict[str, bytes], size: int) -> bytes:
    """A gzip tar: the members, then a pax extended header of `size` zero bytes (which tarfile reads whole).
    The gzip CRC is left 0: reading stops long before it."""
    prefix = b""
    for name, content in members.items():
        member = tarfile.TarInfo(name)
        member.size = len(content)
        prefix += member.tobuf(tarfile.USTAR_FORMAT) + content + bytes(-len(content) % 512)
    extended = tarfile.TarInfo("././@PaxHeader")
    extended.type, extended.size = tarfile.XHDTYPE, size
    prefix += extended.tobuf(tarfile.USTAR_FORMAT)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no time, unknown OS
    return gzip_header + deflated_zeros(prefix, size) + struct.pack("<2L", 0, (len(prefix) + size) % 2**32)


def npz_entry(name: str, content: bytes) -> bytes:
    """An .npz holding one member of exactly these bytes (a header and payload that may disagree)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


GOOD = {f"a/good-{seed:02d}.png": encode(noise(seed)) for seed in range(12)}


def write_source(root: Path) -> Path:
    samples = {f"s{number}.png": encode(noise(100 + number)) for number in (1, 2, 3)}
    source = write_folder(root, GOOD | {
        "a/bomb.npz": npz_bomb(SIDE),
        "a/shard.tar": tar_with_sparse_member(samples, "s2.png", EXPANDED),
        # s2 is lost with the archive: a sample is complete only when the next member's name is read.
        "a/header.tgz": tgz_with_huge_extended_header({"s1.png": encode(noise(108)), "s2.png": b"lost"}, EXPANDED),
        "a/bzip2.tar": bz2.compress(tar_shard({"s1.png": encode(noise(109))})),
        "a/pickled.npz": npz(images=np.array([None, 1], dtype=object)),
        "a/pickled-labels.npz": npz(images=noise(105, (2, 20, 20)), labels=np.array([0, None], dtype=object)),
        "a/cut.npz": npz_entry("images.npy", npy_header((2, 20, 20)) + noise(106, (20, 20)).tobytes()),
    })
    return source


def prepare_under_limit(data: DataParams, root: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """prepare in a child process allowed HEADROOM of address space above what its imports mapped; its data
    report, if it wrote one."""
    env = os.environ | {"MALLOC_ARENA_MAX": "2"}  # each thread's malloc arena reserves 64 MiB of address space
    arguments = [str(HEADROOM), data.model_dump_json(), str(root / "out"), str(root / "data.json")]
    child = subprocess.run([sys.executable, "-c", CHILD, *arguments], cwd=REPO, env=env, capture_output=True, text=True)
    report = root / "data.json"
    return child, json.loads(report.read_text()) if report.exists() else None


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_source(tmp_path_factory.mktemp("memory") / "source")


def test_declared_sizes_are_rejected_unread_and_the_rest_prepares(source: Path, tmp_path: Path) -> None:
    data = data_params(str(source), download_workers=4)
    limit = ImageShape.of(data).read_limit
    assert limit == 8 * data.max_image_pixels + METADATA_BYTES, "the rule sources.py documents"

    child, report = prepare_under_limit(data, tmp_path)

    assert child.returncode == 0, child.stderr[-3000:]
    reasons = {reject["key"]: reject["reason"] for reject in report["rejects"]}
    expected = {
        "a/bomb.npz#images": ["absurd dimensions 60000x60000", "(1, 60000, 60000)", "data.max_image_pixels (25000000)"],
        "a/shard.tar#s2": ["member s2.png", f"{EXPANDED} bytes", f"more than the {limit}"],
        "a/header.tgz": ["corrupt tar archive after 1 samples", f"@PaxHeader: a {EXPANDED}-byte extended header",
                         f"more than {METADATA_BYTES}"],
        "a/bzip2.tar": ["bzip2"],
        "a/pickled.npz#images": ["pixels are object"],
        "a/pickled-labels.npz#images": ["unreadable labels", "object"],
        "a/cut.npz#images": ["declares shape (2, 20, 20)", "zip entry holds"],
    }
    assert set(reasons) == set(expected)
    for key, phrases in expected.items():
        assert all(phrase in reasons[key] for phrase in phrases), f"{key}: {reasons[key]}"
    assert report["accepted"] == len(GOOD) + 3, "good images, and the good samples around a shard's bad member"
    kept = {item["key"] for item in json.loads((tmp_path / "out" / "manifest.json").read_text())["objects"]}
    assert kept == set(GOOD) | {"a/shard.tar#s1", "a/shard.tar#s3", "a/header.tgz#s1"}


def test_on_error_fail_stops_at_a_member_too_large_to_read(tmp_path: Path) -> None:
    member = tar_with_sparse_member({"s1.png": encode(noise(110))}, "s1.png", EXPANDED)
    source = write_folder(tmp_path / "source", GOOD | {"a/shard.tar": member})

    child, report = prepare_under_limit(data_params(str(source), on_error="fail"), tmp_path)

    assert child.returncode == 1, child.stderr[-3000:]
    assert child.stderr.strip().splitlines()[-1].startswith(
        f"prepare: a/shard.tar#s1 under {source}: too large: member s1.png declares {EXPANDED} bytes"
    )
    assert [reject["key"] for reject in report["rejects"]] == ["a/shard.tar#s1"]


def test_an_image_object_over_the_read_limit_is_rejected_by_its_listed_size(tmp_path: Path) -> None:
    # A small limit, so the object can be small: the local listing itself reads each file whole (for its etag).
    data = data_params(str(tmp_path / "source"), max_image_pixels=1000)
    limit = ImageShape.of(data).read_limit
    write_folder(tmp_path / "source", GOOD | {"a/big.png": encode(noise(107)).ljust(limit + 1, b"\0")})

    manifest = prepare(data, tmp_path / "out", tmp_path / "data.json")

    report = json.loads((tmp_path / "data.json").read_text())
    assert report["rejects"] == [{
        "key": "a/big.png",
        "reason": f"too large: the object declares {limit + 1} bytes, more than the {limit} one image may take "
        f"(8 x data.max_image_pixels + {METADATA_BYTES}); not read",
    }]
    assert {item["key"] for item in manifest["objects"]} == set(GOOD)
