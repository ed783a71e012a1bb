"""Stage prepare on every source format: image files, WebDataset tar shards, .npz arrays; S3 and local."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import data_params, encode, noise, npz, pixels_by_key, tar_shard, upload, write_folder

from pipelines.dataset import load_split
from pipelines.stages.prepare import prepare
from pipelines.stack import ensure_bucket
from pipelines.storage import s3_client

BUCKET = "gan-test-data"
TEAL = (20, 160, 140)


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    ensure_bucket(BUCKET)
    return f"s3://{BUCKET}"


def solid(mode: str, colour: int | tuple[int, ...], size: tuple[int, int] = (24, 24)) -> Image.Image:
    return Image.new(mode, size, colour)


def prepared(source: str, tmp_path: Path, **overrides) -> tuple[dict, np.ndarray, np.ndarray]:
    manifest = prepare(data_params(source, **overrides), tmp_path / "prepared", tmp_path / "data.json")
    train, test = (load_split(tmp_path / "prepared", split) for split in ("train", "test"))
    return manifest, np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]])


def test_png_jpeg_webp_in_any_mode_become_rgb_or_grayscale(bucket: str, tmp_path: Path) -> None:
    files = {
        "gray/l.png": encode(solid("L", 77)),
        "gray/bilevel.png": encode(solid("1", 1)),
        "gray/l.jpg": encode(solid("L", 200), "JPEG", quality=95),
        "colour/rgb.png": encode(solid("RGB", TEAL)),
        "colour/rgba.png": encode(solid("RGBA", (*TEAL, 255))),
        "colour/palette.png": encode(solid("RGB", TEAL).quantize(4)),
        "colour/rgb.webp": encode(solid("RGB", TEAL), "WEBP", lossless=True),
        "colour/rgb.jpg": encode(solid("RGB", (*TEAL[:2], 141)), "JPEG", quality=95),
    }
    upload(f"{bucket}/formats", files)

    for channels in (3, 1):
        manifest, _, _ = prepared(f"{bucket}/formats", tmp_path / str(channels), channels=channels)
        pixels = pixels_by_key(manifest, tmp_path / str(channels) / "prepared")

        assert manifest["counts"]["rejected"] == 0 and set(pixels) == set(files)
        assert manifest["class_names"] == ["colour", "gray"]
        assert all(image.shape == (16, 16, channels) for image in pixels.values())
        teal = np.array(TEAL if channels == 3 else [solid("RGB", TEAL).convert("L").getpixel((0, 0))])
        for key in ("colour/rgb.png", "colour/rgba.png", "colour/palette.png", "colour/rgb.webp"):
            assert (pixels[key] == teal).all(), f"{key}: exact colour (opaque: the background does not show)"
        assert np.abs(pixels["colour/rgb.jpg"].astype(int) - teal).max() <= 4, "JPEG is lossy"
        assert (pixels["gray/l.png"] == 77).all() and (pixels["gray/bilevel.png"] == 255).all()


def test_resize_is_the_stated_antialiased_filter(tmp_path: Path) -> None:
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    source = write_folder(tmp_path / "images", {"checkerboard.png": encode(checkerboard)})

    for name, pil_filter in (("lanczos", Image.Resampling.LANCZOS), ("box", Image.Resampling.BOX)):
        manifest, images, _ = prepared(str(source), tmp_path / name, resize_filter=name, test_fraction=0.01)

        assert manifest["resize_filter"] == pil_filter.name
        expected = np.asarray(Image.fromarray(checkerboard).resize((16, 16), pil_filter))
        assert (images[0, :, :, 0] == expected).all()
        # Antialiased: 1-pixel stripes average to mid-grey instead of aliasing to black or white.
        assert np.abs(images.astype(int) - 128).max() <= 2


def test_non_square_images_are_centre_cropped(tmp_path: Path) -> None:
    wide = np.zeros((16, 48, 3), dtype=np.uint8)
    wide[:, :16, 0], wide[:, 16:32, 1], wide[:, 32:, 2] = 255, 255, 255
    source = write_folder(tmp_path / "images", {"wide.png": encode(wide), "tall.png": encode(wide.transpose(1, 0, 2))})

    manifest, images, _ = prepared(str(source), tmp_path, channels=3, test_fraction=0.01)

    assert manifest["crop"] == "centre" and len(images) == 2
    assert (images == np.array([0, 255, 0], dtype=np.uint8)).all(), "only the green middle third survives"


def test_webdataset_tar_shards_with_cls_labels(bucket: str, tmp_path: Path) -> None:
    first = tar_shard({
        "000001.png": encode(noise(1)), "000001.cls": b"3\n",
        "000002.jpg": encode(noise(2), "JPEG"), "000002.cls": b"10", "000002.json": b'{"caption": "ignored"}',
        "part/000003.webp": encode(noise(3), "WEBP"), "part/000003.cls": b"3",
    })
    # Over s3transfer's 8 MiB multipart threshold: read in ranged parts pinned to the listed ETag.
    large = tar_shard({"000004.png": encode(noise(4)), "000004.cls": b"10", "000004.bin": bytes(9 << 20)})
    upload(f"{bucket}/wds", {"train-0000.tar": first, "train-0001.tar": large})

    manifest, images, labels = prepared(f"{bucket}/wds", tmp_path)

    assert manifest["counts"]["rejected"] == 0
    assert manifest["class_names"] == ["3", "10"], "numeric classes in numeric order"
    by_key = {item["key"]: item for item in manifest["objects"]}
    assert set(by_key) == {"train-0000.tar#000001", "train-0000.tar#000002", "train-0000.tar#part/000003",
                           "train-0001.tar#000004"}
    assert [by_key[key]["label"] for key in sorted(by_key)] == [0, 1, 0, 1]
    assert images.shape == (4, 16, 16, 1) and sorted(labels) == [0, 0, 1, 1]


def test_npz_arrays_in_hw_hwc_and_chw_layouts(tmp_path: Path) -> None:
    chw = np.zeros((3, 3, 20, 20), dtype=np.uint8)
    chw[:, 0], chw[:, 1], chw[:, 2] = 10, 20, 30
    chw[:, 0, 0, 0] = [1, 2, 3]  # three different images
    files = {
        "gray.npz": npz(images=np.stack([noise(seed) for seed in range(4)]), labels=np.array([0, 1, 1, 2])),
        "keras.npz": npz(x_train=chw, y_train=np.array([2, 2, 0]),
                         x_test=np.stack([noise(seed, (20, 20, 3)) for seed in (7, 8)]), y_test=np.array([1, 0])),
    }
    source = write_folder(tmp_path / "arrays", files)

    manifest, images, _ = prepared(str(source), tmp_path, channels=3)

    assert manifest["counts"]["rejected"] == 0 and images.shape == (9, 16, 16, 3)
    assert manifest["class_names"] == ["0", "1", "2"]
    by_key = {item["key"]: item["label"] for item in manifest["objects"]}
    assert by_key["gray.npz#images[3]"] == 2 and by_key["keras.npz#x_test[0]"] == 1
    pixels = pixels_by_key(manifest, tmp_path / "prepared")
    assert (pixels["keras.npz#x_train[1]"][4:] == [10, 20, 30]).all(), "channels-first rows become RGB"
    assert (pixels["gray.npz#images[0]"][..., 0] == pixels["gray.npz#images[0]"][..., 2]).all()


def test_versioned_bucket_reads_and_records_the_listed_versions(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3_client()
    ensure_bucket("gan-test-versioned")
    client.put_bucket_versioning(Bucket="gan-test-versioned", VersioningConfiguration={"Status": "Enabled"})
    for colour in (50, 150):  # two versions: the current one is read
        client.put_object(Bucket="gan-test-versioned", Key="data/a/x.png", Body=encode(solid("L", colour)))
    client.put_object(Bucket="gan-test-versioned", Key="data/a/y.png", Body=encode(solid("L", 90)))
    client.put_object(Bucket="gan-test-versioned", Key="data/a/deleted.png", Body=encode(solid("L", 5)))
    client.delete_object(Bucket="gan-test-versioned", Key="data/a/deleted.png")
    current = client.head_object(Bucket="gan-test-versioned", Key="data/a/x.png")["VersionId"]

    manifest, _, _ = prepared("s3://gan-test-versioned/data", tmp_path, test_fraction=0.01)

    by_key = {item["key"]: item for item in manifest["objects"]}
    assert set(by_key) == {"a/x.png", "a/y.png"}, "a deleted key is not read"
    assert by_key["a/x.png"]["version_id"] == current
    assert (pixels_by_key(manifest, tmp_path / "prepared")["a/x.png"] == 150).all()
