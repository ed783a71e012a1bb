"""Starting or joining Ray, and where Ray keeps checkpoints: shared by tune and train."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs
import ray

from pipelines.artifacts import load_reference
from pipelines.dataset import model_shape, read_manifest, shard_files
from pipelines.errors import UserError
from pipelines.storage import s3_endpoint

# Readable output on small machines: one copy of repeated worker lines, no Ray banners.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Train's controller sees a report, a failure or a run's end only when it next polls its workers (Ray's default:
# every 2 s), which every run pays several times; 0.5 s costs one status call per worker per poll
# (docs/results/run-overhead.md). The driver's value is passed on to the controller, on a joined cluster too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    # "local" (or no address): a new cluster for this stage, never one a `ray start` on this machine happened to
    # leave running (ray.init() with no address joins the latest one).
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # A Ray started here is one machine that nobody drains: Train's preemption watcher (an actor polling
        # every 5 s, whose creation logs an E line from Ray's core worker) has nothing to watch. Clusters keep it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # A new local cluster turns on token auth (Ray's safe default) and logs a WARNING saying so, in every
        # Ray stage of a healthy run; there is nothing to do about it, so that one logger keeps to errors.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # The dashboard stays on: Ray Train's placement-group cleanup asks its state API.
    ray.init(address=address, logging_level="WARNING")


def require_resources(workers: int, use_gpu: bool, cpus_per_worker: float = 1.0) -> None:
    """Refuse a request the cluster cannot ever place, instead of waiting for it forever: Ray Train
    holds a run until every worker's CPU (and GPU) is free."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if workers * cpus_per_worker > cpus:
        raise UserError(f"{workers} workers need {workers * cpus_per_worker:g} CPUs, but the Ray cluster has {cpus:g};"
                        " lower train.num_workers (or tune.num_workers), or add nodes")
    if use_gpu and workers > gpus:
        raise UserError(f"train.use_gpu is true and {workers} workers need a GPU each, but the Ray cluster has"
                        f" {gpus:g}; set train.use_gpu: false, lower train.num_workers, or add GPU nodes")


def put_shards(shards: Iterable[tuple[bytes, int]]) -> tuple[tuple, tuple[int, ...]]:
    """(refs, counts): each shard's .npz bytes as one object in the Ray object store, which every node's
    workers read from. The driver holds one shard at a time, and Ray spills objects to disk beyond the
    store's memory, so a split larger than RAM streams too."""
    refs, counts = [], []
    for content, count in shards:
        refs.append(ray.put(content))
        counts.append(count)
    return tuple(refs), tuple(counts)


def publish_training_data(prepared: Path) -> tuple[tuple[tuple, tuple[int, ...]], Any, dict[str, int]]:
    """What tune and train hand their workers: the train shards in the object store, the reference the
    samples are judged against (featurenet and its stored statistics of held-out images) as one object,
    and the model shape of the data. Ray starts only once the inputs are known to be there."""
    reference, shape = load_reference(), model_shape(read_manifest(prepared))
    init_ray()
    return put_shards(shard_files(prepared, "train")), ray.put(reference), shape


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
        endpoint = s3_endpoint()
        options = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            endpoint_url = urlparse(endpoint)
            options.update(endpoint_override=endpoint_url.netloc, scheme=endpoint_url.scheme or "https")
        return f"{parsed.netloc}{parsed.path}", pyarrow.fs.S3FileSystem(**options)
    return str(Path(path).resolve()), None
