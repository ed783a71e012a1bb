"""Starting or joining Ray, and where Ray keeps checkpoints: shared by tune and train."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs
import ray

# Readable output on small machines: one copy of repeated worker lines, no Ray banners.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    # The dashboard stays on even locally: Ray Train's placement-group cleanup asks its state API.
    ray.init(logging_level="WARNING")


def put_shards(shards: Iterable[tuple[bytes, int]]) -> tuple[tuple, tuple[int, ...]]:
    """(refs, counts): each shard's .npz bytes as one object in the Ray object store, which every node's
    workers read from. The driver holds one shard at a time, and Ray spills objects to disk beyond the
    store's memory, so a split larger than RAM streams too."""
    refs, counts = [], []
    for content, count in shards:
        refs.append(ray.put(content))
        counts.append(count)
    return tuple(refs), tuple(counts)


def quiet_worker_logs() -> None:
    """Ray Train logs every report at INFO on each worker's console; the driver's progress line
    says it once. Only the console is quieted: Ray's log files keep everything."""
    for logger in (logging.getLogger(), logging.getLogger("ray.train")):
        for handler in logger.handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.WARNING)


def storage(path: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray storage path plus the filesystem to reach it.

    pyarrow's S3 filesystem ignores AWS_ENDPOINT_URL, so a custom endpoint
    (MinIO, the embedded loopback server) is passed to it explicitly.
    """
    if path.startswith("s3://"):
        parsed = urlparse(path)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            endpoint_url = urlparse(endpoint)
            options.update(endpoint_override=endpoint_url.netloc, scheme=endpoint_url.scheme or "https")
        return f"{parsed.netloc}{parsed.path}", pyarrow.fs.S3FileSystem(**options)
    return str(Path(path).resolve()), None
