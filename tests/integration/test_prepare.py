"""Stage prepare end to end: real S3 endpoint (moto over loopback), real PNGs, real files."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from synthetic import REPO_PARAMS, data_params

from pipelines.stages import prepare as stage
from pipelines.dataset import DatasetError, load_split, read_manifest
from pipelines.stages.prepare import DataQualityError, prepare, split_of
from pipelines.storage import list_objects, read_bytes, s3_client, split_s3_uri

BUCKET = "gan-test-data"


def put(key: str, body: bytes) -> None:
    s3_client().put_object(Bucket=BUCKET, Key=key, Body=body)


def copy(source_uri: str, key: str) -> None:
    bucket, source_key = split_s3_uri(source_uri)
    s3_client().copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": bucket, "Key": source_key})


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def prepared(seeded_bucket: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("prepare")
    out_dir, report = root / "data" / "prepared", root / "reports" / "data.json"
    manifest = prepare(data_params(seeded_bucket), out_dir, report)
    return out_dir, report, manifest


def test_prepares_the_seeded_bucket(prepared: tuple[Path, Path, dict[str, Any]], seeded_bucket: str) -> None:
    out_dir, report, manifest = prepared

    assert manifest == read_manifest(out_dir)
    assert manifest["class_names"] == [str(digit) for digit in range(10)]
    assert manifest["resize_filter"] == "LANCZOS"
    counts = manifest["counts"]
    assert counts["train"] + counts["test"] == 600 and counts["rejected"] == 0
    assert 0.1 < counts["test"] / 600 < 0.3
    for split in ("train", "test"):
        images, labels = load_split(out_dir, split)
        assert images.shape == (counts[split], 16, 16, 1) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and set(labels) == set(range(10))
        assert sum(manifest["class_counts"][split].values()) == counts[split]
        shards = [shard for shard in manifest["shards"] if shard["split"] == split]
        assert len(shards) == math.ceil(counts[split] / 128)
    for shard in manifest["shards"]:
        assert hashlib.sha256((out_dir / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    etags = {stored.key: stored.etag for stored in list_objects(seeded_bucket)}
    assert {item["key"]: item["etag"] for item in manifest["objects"]} == etags
    assert json.loads(report.read_text())["rejects"] == []


@pytest.fixture(scope="module")
def renamed_copies(seeded_bucket: str) -> tuple[str, str]:
    """The same 60 images twice: once in listing order, once under names that list in reverse."""
    for position, stored in enumerate(list_objects(seeded_bucket)[:60]):
        label = stored.key.split("/")[0]
        copy(stored.uri, f"ordered/{label}/{position:03d}.png")
        copy(stored.uri, f"renamed/{label}/{999 - position:03d}.png")
    return f"s3://{BUCKET}/ordered", f"s3://{BUCKET}/renamed"


def test_rerun_gives_identical_outputs(renamed_copies: tuple[str, str], tmp_path: Path) -> None:
    source, _ = renamed_copies

    first = prepare(data_params(source), tmp_path / "a", tmp_path / "a.json")
    second = prepare(data_params(source), tmp_path / "b", tmp_path / "b.json")

    assert first == second
    for shard in first["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()


def test_split_depends_on_content_not_names_or_listing_order(renamed_copies: tuple[str, str], tmp_path: Path) -> None:
    ordered_source, renamed_source = renamed_copies

    ordered = prepare(data_params(ordered_source), tmp_path / "a", tmp_path / "a.json")
    renamed = prepare(data_params(renamed_source), tmp_path / "b", tmp_path / "b.json")

    assert ordered["dataset_hash"] == renamed["dataset_hash"]
    assert ordered["shards"] == renamed["shards"]
    def split_by_content(manifest: dict[str, Any]) -> dict[str, str]:
        return {item["sha256"]: item["split"] for item in manifest["objects"]}

    assert split_by_content(ordered) == split_by_content(renamed)


def test_split_assignment_is_a_stable_function_of_content() -> None:
    digests = [hashlib.sha256(str(number).encode()).hexdigest() for number in range(2000)]

    splits = [split_of(digest, 0, 0.25) for digest in digests]

    assert splits == [split_of(digest, 0, 0.25) for digest in digests]
    assert 0.2 < splits.count("test") / len(splits) < 0.3
    assert splits != [split_of(digest, 1, 0.25) for digest in digests]


def test_rejects_bad_objects_and_keeps_the_good_ones(seeded_bucket: str, tmp_path: Path) -> None:
    objects = list_objects(seeded_bucket)
    good = [stored for digit in "01" for stored in objects if stored.key.startswith(f"{digit}/")][:10]
    good += [stored for stored in objects if stored.key.startswith("1/")][:10]
    for stored in good:
        copy(stored.uri, f"messy/{stored.key}")
    whole = read_bytes(good[0].uri)
    put("messy/0/truncated.png", whole[: len(whole) // 2])
    put("messy/0/empty.png", b"")
    put("messy/1/notes.txt", b"these are not pixels\n")
    put("messy/1/copy-of-first.png", whole)
    report_path = tmp_path / "data.json"

    manifest = prepare(data_params(f"s3://{BUCKET}/messy"), tmp_path / "prepared", report_path)

    report = json.loads(report_path.read_text())
    reasons = {reject["key"]: reject["reason"] for reject in report["rejects"]}
    assert set(reasons) == {"0/truncated.png", "0/empty.png", "1/notes.txt", "1/copy-of-first.png"}
    assert reasons["0/empty.png"] == "empty object (0 bytes)"
    assert reasons["1/copy-of-first.png"] == f"duplicate of {good[0].key}"
    assert "not an image" in reasons["1/notes.txt"]
    assert "corrupt" in reasons["0/truncated.png"]
    assert (report["listed"], report["accepted"], report["rejected"]) == (24, 20, 4)
    assert sorted(item["key"] for item in manifest["objects"]) == sorted(stored.key for stored in good)
    assert manifest["class_names"] == ["0", "1"]


def test_mostly_bad_data_fails_and_keeps_previous_outputs(seeded_bucket: str, tmp_path: Path) -> None:
    copy(list_objects(seeded_bucket)[0].uri, "junk/0/good.png")
    for number in range(3):
        put(f"junk/0/empty-{number}.png", b"")
    out_dir = tmp_path / "prepared"
    out_dir.mkdir()
    (out_dir / "manifest.json").write_text("{}")

    with pytest.raises(DataQualityError, match=r"3 of 4 images .*max_rejected_fraction is 0.5.*see .*data\.json"):
        prepare(data_params(f"s3://{BUCKET}/junk"), out_dir, tmp_path / "data.json")

    assert json.loads((tmp_path / "data.json").read_text())["rejected"] == 3
    assert (out_dir / "manifest.json").read_text() == "{}"


def test_local_folder_with_class_folders_in_rgb(tmp_path: Path) -> None:
    source = tmp_path / "images"
    for name, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (source / name).mkdir(parents=True)
        for number in range(6):
            (source / name / f"{number}.png").write_bytes(png((20 + number, 24), colour))

    params = data_params(str(source), channels=3, test_fraction=0.5)

    manifest = prepare(params, tmp_path / "prepared", tmp_path / "r.json")

    assert manifest["class_names"] == ["cat", "dog"]
    images, labels = load_split(tmp_path / "prepared", "train")
    test_images, _ = load_split(tmp_path / "prepared", "test")
    assert images.shape[1:] == (16, 16, 3) and len(images) + len(test_images) == 12
    assert all(images[labels == 0][..., 0].mean(axis=(1, 2)) > images[labels == 0][..., 2].mean(axis=(1, 2)))


def test_flat_local_folder_is_unlabelled(tmp_path: Path) -> None:
    source = tmp_path / "flat"
    source.mkdir()
    for number in range(5):
        (source / f"{number}.png").write_bytes(png((16, 16), (number * 40, 0, 0)))

    manifest = prepare(data_params(str(source), test_fraction=0.01), tmp_path / "prepared", tmp_path / "r.json")

    assert manifest["class_names"] == []
    assert {item["label"] for item in manifest["objects"]} == {-1}


def test_load_split_names_a_shard_that_differs_from_the_manifest(
    prepared: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    out_dir, _, manifest = prepared
    copied = tmp_path / "prepared"
    copied.mkdir()
    for path in out_dir.iterdir():
        (copied / path.name).write_bytes(path.read_bytes())
    shard = manifest["shards"][0]
    (copied / shard["file"]).write_bytes(b"tampered")

    with pytest.raises(DatasetError, match=rf"{shard['file']}.*dvc repro prepare"):
        load_split(copied, shard["split"])


def run_main(params_dir: Path, data: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> int:
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["data"] |= data
    (params_dir / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(params_dir)
    try:
        stage.main()
    except SystemExit as exit:
        return exit.code
    return 0


def test_main_writes_outputs_and_prints_a_summary(
    seeded_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    copy(list_objects(seeded_bucket)[0].uri, "main/0/a.png")
    copy(list_objects(seeded_bucket)[-1].uri, "main/9/b.png")

    code = run_main(tmp_path, {"source": f"s3://{BUCKET}/main", "image_size": 16}, monkeypatch)

    assert code == 0
    assert "prepare: " in capsys.readouterr().out
    assert (tmp_path / "data" / "prepared" / "manifest.json").is_file()
    assert (tmp_path / "reports" / "data.json").is_file()


@pytest.mark.parametrize(
    ("data", "expected"),
    [({"image_size": 17}, "data.image_size"), ({"source": "s3://gan-no-such-bucket/x"}, "does not exist")],
)
def test_main_exits_2_with_a_message_on_bad_params_or_storage(
    s3_endpoint: str, data: dict[str, Any], expected: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    code = run_main(tmp_path, data, monkeypatch)

    assert code == 2
    error = capsys.readouterr().err
    assert expected in error and "Traceback" not in error
