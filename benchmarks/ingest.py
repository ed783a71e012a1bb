"""Ingest benchmark: stage prepare beside a plain parallel boto3 download of the same objects, in one run.

    python -m benchmarks.ingest                           # 50,000 small PNGs on an embedded moto server
    python -m benchmarks.ingest --source s3://bucket/pfx  # objects already at AWS_ENDPOINT_URL (or real S3)

The sides alternate (--rounds), each in its own child process, so the printed peak RSS (from
wait4) is that side's alone. prepare also decodes, resizes and shards; the plain side only reads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import yaml
from botocore.config import Config
from PIL import Image
from tqdm import tqdm

from benchmarks import results
from pipelines.config import DataParams
from pipelines.stack import endpoint_url, ensure_bucket, start_s3_server, stop, use_moto_defaults
from pipelines.stages.prepare import prepare
from pipelines.storage import list_objects, s3_client, split_s3_uri

REPO = Path(__file__).resolve().parents[1]
BENCH_SOURCE = "s3://gan-bench/ingest"
CLASSES = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="an existing s3:// prefix; default: seed an embedded moto server")
    parser.add_argument("--objects", type=int, default=50_000, help="synthetic objects to seed")
    parser.add_argument("--object-side", type=int, default=32, help="side of each synthetic RGB PNG")
    parser.add_argument("--image-size", type=int, default=64, help="data.image_size for prepare")
    parser.add_argument("--channels", type=int, default=3, help="data.channels for prepare")
    parser.add_argument("--workers", type=int, default=16, help="download workers on both sides")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two sides this many times; best is shown")
    parser.add_argument("--child", choices=["plain", "prepare"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    server = None
    if not args.source:
        server = _start_moto()
        args.source = BENCH_SOURCE
        _seed(args.source, args.objects, args.object_side)
    try:
        _compare(args)
    finally:
        if server:
            stop(server)


def _compare(args: argparse.Namespace) -> None:
    listed = list_objects(args.source)
    count, megabytes = len(listed), sum(stored.size for stored in listed) / 1e6
    print(f"{args.source}: {count} objects, {megabytes:.1f} MB; {args.workers} workers", flush=True)
    rounds = [{side: _run_child(side, args) for side in ("plain", "prepare")} for _ in range(args.rounds)]
    best = {side: min((run[side] for run in rounds), key=lambda result: result["seconds"]) for side in rounds[0]}
    report = results.Report()
    report.line(f"`{args.source}`: {count} objects, {megabytes:.1f} MB; {args.workers} download workers on both "
                f"sides; best of {args.rounds} alternating round(s), each side in its own process.\n")
    report.line("| side | seconds per round | objects/s | MB/s | peak RSS (MB) | CPU s |")
    report.line("|---|---|---:|---:|---:|---:|")
    for side, result in best.items():
        result["peak_rss_mb"] = max(run[side]["peak_rss_mb"] for run in rounds)
        seconds = ", ".join(f"{run[side]['seconds']:.1f}" for run in rounds)
        report.line(f"| {side} | {seconds} | {count / result['seconds']:.0f} | {megabytes / result['seconds']:.2f} | "
                    f"{result['peak_rss_mb']:.0f} | {result['cpu']:.1f} |")
    ratio = best["plain"]["seconds"] / best["prepare"]["seconds"]
    decoded_mb = count * args.image_size**2 * args.channels / 1e6
    report.line(f"\nprepare / plain throughput: {ratio:.2f}x (target >= 0.9x). prepare also decodes, resizes to "
                f"{args.image_size} px and shards; the prepared pixels of the whole dataset: {decoded_mb:.0f} MB.")
    report.save("ingest", {"objects": count, "megabytes": megabytes, "rounds": rounds, "prepare_over_plain": ratio},
                spread=f"best of {args.rounds} round(s), every round listed")


def _run_child(side: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.ingest", "--child", side, "--source", args.source,
               "--workers", str(args.workers), "--image-size", str(args.image_size), "--channels", str(args.channels)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{side} child failed with status {status}")
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return json.loads(output.strip().splitlines()[-1]) | {"peak_rss_mb": usage.ru_maxrss / 1024, "cpu": cpu_seconds}


def _plain(args: argparse.Namespace) -> dict:
    """List with a paginator, then GET every object on a thread pool: the floor prepare is measured against."""
    client = boto3.session.Session().client("s3", config=Config(max_pool_connections=args.workers))
    bucket, prefix = split_s3_uri(args.source)
    started = time.perf_counter()
    keys = [entry["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
            for entry in page.get("Contents", [])]

    def read(key: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    with ThreadPoolExecutor(args.workers) as pool:
        total = sum(pool.map(read, keys))
    return {"seconds": time.perf_counter() - started, "objects": len(keys), "bytes": total}


def _prepare(args: argparse.Namespace) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())["data"] | {
        "source": args.source, "image_size": args.image_size, "channels": args.channels,
        "download_workers": args.workers,
    }
    with tempfile.TemporaryDirectory(prefix="ingest-") as folder:
        started = time.perf_counter()
        manifest = prepare(DataParams(**params), Path(folder) / "prepared", Path(folder) / "data.json")
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "objects": len(manifest["objects"]), "rejected": manifest["counts"]["rejected"]}


CHILDREN = {"plain": _plain, "prepare": _prepare}


def _start_moto():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ["AWS_ENDPOINT_URL"] = endpoint_url(port)
    use_moto_defaults(os.environ)
    s3_client.cache_clear()
    return start_s3_server(port)


def _seed(source: str, count: int, side: int) -> None:
    bucket, prefix = split_s3_uri(source)
    ensure_bucket(bucket)
    client = s3_client()

    def put(number: int) -> None:
        buffer = io.BytesIO()
        pixels = np.random.default_rng(number).integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        client.put_object(Bucket=bucket, Key=f"{prefix}/{number % CLASSES}/{number:06d}.png", Body=buffer.getvalue())

    with ThreadPoolExecutor(32) as pool:
        for _ in tqdm(pool.map(put, range(count)), total=count, unit="obj", desc=f"seed {source}", mininterval=5):
            pass


if __name__ == "__main__":
    main()
