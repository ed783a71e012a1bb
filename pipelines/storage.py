"""s3:// and local URIs behind one small interface, plus atomic local writes.

Anything that is not an s3:// URI is a local path, so the same stage code reads a
bucket in production and a folder on a laptop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.manager import TransferConfig, TransferManager
from s3transfer.subscribers import BaseSubscriber

from pipelines.errors import UserError

DEFAULT_MAX_ATTEMPTS = 10
LIST_WORKERS = 8  # sub-prefixes (class folders) listed at once
SPOOL_BYTES = 8 << 20  # a downloaded object stays in memory up to this size, beyond it in a temp file
_ACCESS_DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_MISSING_KEY_CODES = {"NoSuchKey", "404"}


class StorageError(UserError):
    """A storage operation failed for a reason the user can fix; the message says how."""


@dataclass(frozen=True)
class StoredObject:
    uri: str
    key: str  # relative to the listed prefix, '/'-separated
    size: int
    etag: str  # md5 hex for local files and single-part S3 uploads
    version_id: str | None = None  # set in a versioned bucket; reads then get exactly the listed version


T = TypeVar("T")
R = TypeVar("R")


def s3_endpoint() -> str | None:
    """A custom S3 endpoint (MinIO, the embedded loopback server) from the environment, as boto3 reads it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.cache
def s3_client() -> BaseClient:
    """One client per process: the standard credential chain, endpoint from AWS_ENDPOINT_URL.

    Call `s3_client.cache_clear()` after changing AWS_* environment variables in-process.
    """
    custom_endpoint = s3_endpoint()
    config = Config(
        # AWS_MAX_ATTEMPTS still wins so a caller can fail fast; explicit Config values override the env.
        retries={"mode": "standard", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))},
        max_pool_connections=64,
        connect_timeout=5,
        read_timeout=60,
        # S3-compatible servers (MinIO, Ceph, moto) rarely have wildcard DNS for virtual-hosted buckets.
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
    )
    # boto3 reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself; a private session keeps this thread-safe.
    return boto3.session.Session().client("s3", config=config)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"{uri!r}: an s3:// URI needs a bucket, e.g. s3://my-bucket/images")
    return bucket, key.strip("/")


def list_objects(uri: str) -> list[StoredObject]:
    """Every object under an s3:// prefix or a local folder (recursively), sorted by key."""
    objects = sorted(iter_objects(uri), key=lambda stored: stored.key)
    if not objects:
        raise StorageError(f"{uri}: no objects found; check data.source in params.yaml points at the images")
    return objects


def iter_objects(uri: str) -> Iterator[StoredObject]:
    """Every object under an s3:// prefix or a local folder, yielded while the listing goes on (in no set order)."""
    if uri.startswith("s3://"):
        yield from _iter_s3(uri)
    else:
        yield from _list_local(Path(uri))


def parallel_unordered(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """function(item) on `workers` threads, yielded as each finishes.

    At most 2 x workers calls are in flight, so `items` is consumed lazily and memory
    stays bounded however long it is.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending: set[Future[R]] = set()
        try:
            for item in items:
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (future.result() for future in done)
                pending.add(pool.submit(function, item))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        finally:
            for future in pending:
                future.cancel()


@contextmanager
def open_object(stored: StoredObject) -> Iterator[IO[bytes]]:
    """The object's bytes as a seekable file: in memory up to SPOOL_BYTES, in a temp file beyond.

    S3 reads go through s3transfer, which retries a body cut off mid-stream (botocore's own
    retries end once the response headers are in) and fetches large objects in ranged parts.
    """
    if not stored.uri.startswith("s3://"):
        path = Path(stored.uri)
        if not path.is_file():
            raise StorageError(f"{stored.uri}: no such file")
        with path.open("rb") as stream:
            yield stream
        return
    bucket, key = split_s3_uri(stored.uri)
    client = s3_client()
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as buffer:
        try:
            _transfer_manager(client).download(
                bucket,
                key,
                buffer,
                extra_args={"VersionId": stored.version_id} if stored.version_id else {},
                subscribers=[_ListedObject(stored)],
            ).result()
        except (BotoCoreError, ClientError, RetriesExceededError, S3DownloadFailedError) as error:
            raise _storage_error(error, stored.uri, bucket) from None
        buffer.seek(0)
        yield buffer


def read_bytes(uri: str) -> bytes:
    if not uri.startswith("s3://"):
        path = Path(uri)
        if not path.is_file():
            raise StorageError(f"{uri}: no such file")
        return path.read_bytes()
    bucket, key = split_s3_uri(uri)
    client = s3_client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as error:
        raise _storage_error(error, uri, bucket) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a sibling temp folder that replaces `final` only if the block succeeds.

    Readers see either the old or the new folder, never a half-written one; a failed
    run deletes its temp folder and leaves the previous outputs as they were, and the
    temp folder of a killed run is deleted by the next.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp's private 0700 would otherwise become the published folder's mode
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = final.parent / f"{staging.name}.old"
    if final.exists():
        final.rename(retired)
    staging.rename(final)
    shutil.rmtree(retired, ignore_errors=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")  # serialise first: a bad object leaves no temp file


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as stream:
        stream.write(text)
    os.chmod(stream.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(stream.name, path)


@functools.cache
def _transfer_manager(client: BaseClient) -> TransferManager:
    config = TransferConfig(max_request_concurrency=64, num_download_attempts=DEFAULT_MAX_ATTEMPTS)
    return TransferManager(client, config)


class _ListedObject(BaseSubscriber):
    """Hands s3transfer the size and ETag from the listing: no HEAD request, and ranged parts use If-Match."""

    def __init__(self, stored: StoredObject) -> None:
        self._stored = stored

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._stored.size)
        future.meta.provide_object_etag(f'"{self._stored.etag}"')


def _iter_s3(uri: str) -> Iterator[StoredObject]:
    """Top level first, then each sub-prefix (class folder) on its own thread, LIST_WORKERS at a time."""
    bucket, prefix = split_s3_uri(uri)
    # A trailing slash keeps s3://b/mnist from also matching s3://b/mnist-old/.
    list_prefix = f"{prefix}/" if prefix else ""
    try:
        client = s3_client()  # partial credentials in the environment fail here
        versioned = _is_versioned(client, bucket)
        sub_prefixes = []
        for entries, common_prefixes in _pages(client, bucket, list_prefix, versioned, delimiter="/"):
            yield from _stored_objects(bucket, list_prefix, entries)
            sub_prefixes += [common["Prefix"] for common in common_prefixes]

        def list_sub_prefix(sub_prefix: str) -> list[StoredObject]:
            pages = _pages(client, bucket, sub_prefix, versioned)
            return [stored for entries, _ in pages for stored in _stored_objects(bucket, list_prefix, entries)]

        for listed in parallel_unordered(list_sub_prefix, sub_prefixes, LIST_WORKERS):
            yield from listed
    except (BotoCoreError, ClientError) as error:
        raise _storage_error(error, uri, bucket) from None


def _is_versioned(client: BaseClient, bucket: str) -> bool:
    try:
        return client.get_bucket_versioning(Bucket=bucket).get("Status") in ("Enabled", "Suspended")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in _ACCESS_DENIED_CODES:
            return False  # a role without s3:GetBucketVersioning still reads the latest versions
        raise


def _pages(
    client: BaseClient, bucket: str, prefix: str, versioned: bool, delimiter: str | None = None
) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """(object entries, common prefixes) per listing page; in a versioned bucket only the current versions."""
    arguments = {"Bucket": bucket, "Prefix": prefix} | ({"Delimiter": delimiter} if delimiter else {})
    if versioned:
        for page in client.get_paginator("list_object_versions").paginate(**arguments):
            # A deleted key's latest entry is a delete marker, so none of its versions is IsLatest.
            yield [entry for entry in page.get("Versions", []) if entry["IsLatest"]], page.get("CommonPrefixes", [])
    else:
        for page in client.get_paginator("list_objects_v2").paginate(**arguments):
            yield page.get("Contents", []), page.get("CommonPrefixes", [])


def _stored_objects(bucket: str, list_prefix: str, entries: list[dict[str, Any]]) -> Iterator[StoredObject]:
    for entry in entries:
        if entry["Key"].endswith("/"):  # folder markers made by consoles, not data
            continue
        yield StoredObject(
            uri=f"s3://{bucket}/{entry['Key']}",
            key=entry["Key"][len(list_prefix) :],
            size=entry["Size"],
            etag=entry["ETag"].strip('"'),
            version_id=entry.get("VersionId"),
        )


def _list_local(root: Path) -> list[StoredObject]:
    if not root.is_dir():
        raise StorageError(f"{root}: not a folder and not an s3:// URI; fix data.source in params.yaml")
    objects = []
    for path in root.rglob("*"):
        if path.is_file():
            objects.append(
                StoredObject(
                    uri=str(path),
                    key=path.relative_to(root).as_posix(),
                    size=path.stat().st_size,
                    etag=_file_md5(path),
                )
            )
    return objects


def _file_md5(path: Path) -> str:
    """Streamed: a local file larger than memory is listed (and then rejected by size), not read whole."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _storage_error(error: Exception, uri: str, bucket: str) -> StorageError:
    """Translate a boto error into a StorageError that says what to do."""
    endpoint = s3_endpoint() or "AWS S3"
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{uri}: no usable AWS credentials ({error}). Set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run `aws configure`; for the embedded "
            "stack run `eval \"$(gan stack env)\"`."
        )
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(
            f"{uri}: cannot reach the S3 endpoint {endpoint}. Start the embedded stack with "
            "`gan stack up`, or point AWS_ENDPOINT_URL at a running S3-compatible server."
        )
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in _MISSING_BUCKET_CODES:
            return StorageError(
                f"{uri}: bucket {bucket!r} does not exist at {endpoint}. Create it "
                f"(e.g. `aws s3 mb s3://{bucket}`, or `gan stack up` for the embedded stack) "
                "or fix data.source in params.yaml."
            )
        if code in _ACCESS_DENIED_CODES:
            return StorageError(
                f"{uri}: access denied at {endpoint} ({code}). Check that the credentials in use "
                "(AWS_ACCESS_KEY_ID / AWS_PROFILE) are current and allow s3:ListBucket and "
                f"s3:GetObject on bucket {bucket!r}."
            )
        if code in _MISSING_KEY_CODES:
            return StorageError(f"{uri}: no such object at {endpoint}")
    if isinstance(error, S3DownloadFailedError):
        return StorageError(f"{uri}: the object changed while it was read ({error}); run the stage again")
    return StorageError(f"{uri}: S3 request to {endpoint} failed: {error}")
