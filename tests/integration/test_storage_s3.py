"""pipelines.storage against a real S3 endpoint (moto's server over loopback HTTP) and local folders."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from pipelines.stack import endpoint_url
from pipelines.storage import (
    StorageError,
    atomic_directory,
    list_objects,
    read_bytes,
    s3_client,
    write_json_atomic,
)

SECRET = "do-not-print-this-secret"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """monkeypatch for AWS_* variables, with the cached client rebuilt on both sides of the test."""
    s3_client.cache_clear()
    yield monkeypatch
    s3_client.cache_clear()


def test_client_takes_endpoint_from_environment(s3_endpoint: str) -> None:
    assert s3_client().meta.endpoint_url == s3_endpoint


def test_lists_and_reads_objects_over_http(seeded_bucket: str) -> None:
    objects = list_objects(seeded_bucket)

    assert len(objects) == 600
    assert [stored.key for stored in objects] == sorted(stored.key for stored in objects)
    assert {stored.key.split("/")[0] for stored in objects} == {str(digit) for digit in range(10)}
    first = objects[0]
    assert first.uri == f"{seeded_bucket}/{first.key}"
    content = read_bytes(first.uri)
    assert len(content) == first.size
    assert hashlib.md5(content).hexdigest() == first.etag
    assert Image.open(io.BytesIO(content)).size == (28, 28)


def test_prefix_does_not_match_sibling_prefixes(seeded_bucket: str) -> None:
    s3_client().put_object(Bucket="gan-test-data", Key="mnist-old/0/x.png", Body=b"x")

    assert not any("mnist-old" in stored.uri for stored in list_objects(seeded_bucket))


def test_missing_bucket_names_bucket_and_endpoint(s3_endpoint: str) -> None:
    with pytest.raises(StorageError) as raised:
        list_objects("s3://no-such-bucket/images")

    message = str(raised.value)
    assert "'no-such-bucket' does not exist" in message
    assert s3_endpoint in message
    assert "data.source" in message


def test_empty_prefix_is_an_error(seeded_bucket: str) -> None:
    with pytest.raises(StorageError, match="no objects found"):
        list_objects("s3://gan-test-data/nothing-here")


def test_missing_object_is_an_error(seeded_bucket: str) -> None:
    with pytest.raises(StorageError, match="no such object"):
        read_bytes("s3://gan-test-data/mnist/0/missing.png")


def test_unreachable_endpoint_names_it_and_suggests_the_stack(env: pytest.MonkeyPatch, unused_port: int) -> None:
    closed = endpoint_url(unused_port)
    env.setenv("AWS_ENDPOINT_URL", closed)
    env.setenv("AWS_MAX_ATTEMPTS", "1")
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")

    with pytest.raises(StorageError) as raised:
        list_objects("s3://gan-data/mnist")

    message = str(raised.value)
    assert closed in message
    assert "gan stack up" in message
    assert SECRET not in message


def test_missing_credentials_say_how_to_provide_them(env: pytest.MonkeyPatch, tmp_path: Path, unused_port: int) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        env.delenv(name, raising=False)
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    env.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    env.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env.setenv("AWS_ENDPOINT_URL", endpoint_url(unused_port))

    with pytest.raises(StorageError) as raised:
        list_objects("s3://gan-data/mnist")

    assert "AWS_ACCESS_KEY_ID" in str(raised.value)
    assert "aws configure" in str(raised.value)


def test_local_folder_lists_relative_keys_and_md5_etags(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"first")
    (tmp_path / "b.png").write_bytes(b"second")

    objects = list_objects(str(tmp_path))

    assert [stored.key for stored in objects] == ["b.png", "cats/a.png"]
    assert objects[1].etag == hashlib.md5(b"first").hexdigest()
    assert read_bytes(objects[1].uri) == b"first"


def test_missing_local_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a folder"):
        list_objects(str(tmp_path / "absent"))


def test_atomic_directory_replaces_outputs_on_success(tmp_path: Path) -> None:
    final = tmp_path / "prepared"
    final.mkdir()
    (final / "old.txt").write_text("old")

    with atomic_directory(final) as staging:
        (staging / "new.txt").write_text("new")

    assert sorted(path.name for path in final.iterdir()) == ["new.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prepared"]


def test_atomic_directory_keeps_previous_outputs_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "prepared"
    final.mkdir()
    (final / "old.txt").write_text("old")

    with pytest.raises(RuntimeError, match="stage failed"):
        with atomic_directory(final) as staging:
            (staging / "half-written.txt").write_text("partial")
            raise RuntimeError("stage failed")

    assert sorted(path.name for path in final.iterdir()) == ["old.txt"]
    assert (final / "old.txt").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prepared"]


def test_write_json_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    path = tmp_path / "reports" / "data.json"

    write_json_atomic(path, {"rejected": 0})

    assert json.loads(path.read_text()) == {"rejected": 0}
    assert [entry.name for entry in path.parent.iterdir()] == ["data.json"]
