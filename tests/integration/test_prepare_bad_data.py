"""Stage prepare on a deliberately broken dataset on the loopback S3 server: every kind of bad object
is skipped and reported with its key and reason, or stops the stage when the policy says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import data_params, encode, noise, npz, png_claiming_size, tar_shard, upload

from pipelines.dataset import read_manifest
from pipelines.stages.prepare import DataQualityError, prepare
from pipelines.stack import ensure_bucket

SOURCE = "s3://gan-test-data/corrupt"
GOOD = {f"{label}/good-{seed:02d}.png": encode(noise(seed)) for seed in range(40) for label in ["ab"[seed % 2]]}
FIRST_GOOD = encode(noise(0))
TWO_SAMPLES = tar_shard({"s1.png": encode(noise(100)), "s2.png": encode(noise(101))})

# key -> a phrase its reason must contain
EXPECTED = {
    "a/empty.png": "empty object (0 bytes)",
    "a/truncated.png": "corrupt image",
    "a/garbage.png": "not an image format",
    "a/notes.txt": "not an image format",
    "a/anim.gif": "GIF image: only PNG, JPEG and WebP",
    "a/cmyk.jpg": "wrong channels: pixel mode CMYK (4 channels)",
    "b/sixteen-bit.png": "wrong channels: pixel mode I;16",
    "b/bomb.png": "absurd dimensions 6000x6000: more than data.max_image_pixels",
    "b/strip.png": "absurd dimensions 400x2",
    "b/copy.png": "duplicate of a/good-00.png",
    "stray.png": "no label",
    "a/shard.tar#s2": "unreadable label in .cls: 'cat?'",
    "a/shard.tar#s3": "expected one image in the sample, found .cls",
    "a/cut.tar": "corrupt tar archive after 1 samples",
    "a/arrays.npz#images": "wrong channels: array of shape (2, 20, 20, 2)",
    "a/arrays.npz#x": "pixels are float32",
    "a/arrays.npz#x_val": "unreadable labels",
    "a/rows.npz#images[1]": "unreadable label -1",
    "a/broken.npz": "corrupt .npz archive",
}


@pytest.fixture(scope="module")
def corrupt_source(s3_endpoint: str) -> str:
    ensure_bucket("gan-test-data")
    upload(SOURCE, GOOD | {
        "a/empty.png": b"",
        "a/truncated.png": FIRST_GOOD[: len(FIRST_GOOD) // 2],
        "a/garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "a/notes.txt": b"these are not pixels\n",
        "a/anim.gif": encode(noise(200), "GIF"),
        "a/cmyk.jpg": encode(Image.new("CMYK", (20, 20), (0, 50, 100, 0)), "JPEG"),
        "b/sixteen-bit.png": encode(Image.fromarray(noise(201).astype(np.uint16) * 256)),
        "b/bomb.png": png_claiming_size(6000, 6000),
        "b/strip.png": encode(noise(202, (2, 400))),
        "b/copy.png": FIRST_GOOD,
        "stray.png": encode(noise(203)),
        "a/shard.tar": tar_shard({
            "s1.png": encode(noise(204)),  # labelled by its tar's folder
            "s2.png": encode(noise(205)), "s2.cls": b"cat?",
            "s3.cls": b"1",
        }),
        "a/cut.tar": TWO_SAMPLES[: 512 + 512 + 600],  # the first sample whole, the second cut off
        "a/arrays.npz": npz(images=np.zeros((2, 20, 20, 2), np.uint8), x=np.zeros((2, 20, 20), np.float32),
                            x_val=noise(206, (3, 20, 20)), y_val=np.array([0, 1])),
        "a/rows.npz": npz(images=noise(207, (2, 20, 20)), labels=np.array([0, -1])),
        "a/broken.npz": npz(images=noise(208, (4, 20, 20)))[:-60],
    })
    return SOURCE


@pytest.fixture(scope="module")
def skipped(corrupt_source: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("corrupt")
    manifest = prepare(data_params(corrupt_source), root / "prepared", root / "data.json")
    return root, manifest, json.loads((root / "data.json").read_text())


def test_every_bad_object_is_reported_with_its_key_and_reason(skipped: tuple[Path, dict, dict]) -> None:
    _, _, report = skipped
    reasons = {reject["key"]: reject["reason"] for reject in report["rejects"]}

    assert set(reasons) == set(EXPECTED)
    for key, phrase in EXPECTED.items():
        assert phrase in reasons[key], f"{key}: {reasons[key]}"
    assert [reject["key"] for reject in report["rejects"]] == sorted(reasons), "sorted by key"


def test_good_images_are_kept_around_the_bad_ones(skipped: tuple[Path, dict, dict]) -> None:
    root, manifest, report = skipped

    kept = {item["key"] for item in manifest["objects"]}
    assert kept == set(GOOD) | {"a/shard.tar#s1", "a/cut.tar#s1", "a/rows.npz#images[0]"}
    assert manifest["class_names"] == ["0", "a", "b"]
    assert (report["accepted"], report["rejected"]) == (len(kept), len(EXPECTED))
    assert manifest["counts"]["rejected"] == len(EXPECTED)
    assert read_manifest(root / "prepared") == manifest


def test_too_many_rejects_fail_with_a_pointer_to_the_report(corrupt_source: str, tmp_path: Path) -> None:
    out_dir, report_path = tmp_path / "prepared", tmp_path / "reports" / "data.json"
    out_dir.mkdir()
    (out_dir / "manifest.json").write_text("{}")
    total = len(GOOD) + 3 + len(EXPECTED)
    at_limit = len(EXPECTED) / total

    prepare(data_params(corrupt_source, max_rejected_fraction=at_limit + 1e-9), tmp_path / "ok", tmp_path / "ok.json")
    with pytest.raises(DataQualityError, match=rf"{len(EXPECTED)} of {total} images .*see {report_path}"):
        prepare(data_params(corrupt_source, max_rejected_fraction=at_limit - 0.01), out_dir, report_path)

    assert json.loads(report_path.read_text())["rejected"] == len(EXPECTED)
    assert (out_dir / "manifest.json").read_text() == "{}", "the previous outputs stay"


def test_on_error_fail_stops_at_the_first_bad_object(corrupt_source: str, tmp_path: Path) -> None:
    with pytest.raises(DataQualityError, match="data.on_error is fail") as raised:
        prepare(data_params(corrupt_source, on_error="fail"), tmp_path / "prepared", tmp_path / "data.json")

    report = json.loads((tmp_path / "data.json").read_text())
    assert len(report["rejects"]) == 1
    assert str(raised.value).startswith(f"{report['rejects'][0]['key']} under {corrupt_source}: ")
    assert report["rejects"][0]["key"] in EXPECTED
    assert not (tmp_path / "prepared").exists()
