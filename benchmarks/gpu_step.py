"""The GPU path of the training step, side by side in one run: float32 against bf16 autocast with channels-last.

    python -m benchmarks.gpu_step [--rounds 3] [--steps 60] [--cpu]  # writes docs/results/gpu-step.md (not with --cpu)

Each row is gancore's TrainingState (the default DCGAN at --cases' size, batch and width, conditional on
10 classes, params.yaml's recipe values written out below) wrapped as a Ray Train GPU worker wraps it: G and D each in DistributedDataParallel with
DDP_OPTIONS over an NCCL process group (world size 1: one GPU here), tensors moved to the GPU; the bf16 rows add
what train.use_gpu turns on (channels-last tensors and bf16 autocast for the forward passes). Needs torch,
numpy and scipy only, so it runs where Ray is not installed. Rows run in interleaved rounds and every ratio is
taken within a round; img/s is over `--steps` timed steps after 10 warm-up steps, synchronised before the clock
stops. Also checked per row: every loss stays finite, and the bf16 run's losses stay near float32's.
--cpu runs the same on the CPU over gloo (a dry run of the script, not a measurement of the GPU path).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks import results
from gancore.models import ModelSpec
from gancore.step import StepSettings
from gancore.training import DDP_OPTIONS, OptimizerSettings, TrainingState

RECIPE = OptimizerSettings(lr_g=4e-4, lr_d=2e-4, beta1=0.0, beta2=0.9)  # params.yaml's train.* defaults
ROWS = {"float32": (torch.contiguous_format, None), "float32 + channels-last": (torch.channels_last, None),
        "bf16 + channels-last": (torch.channels_last, torch.bfloat16)}
WARMUP = 10


def ddp_options() -> dict:
    """DDP_OPTIONS where this torch has them; before forward_sync_buffers existed (torch < 2.13, as on some
    GPU images), broadcast_buffers=False is the same choice: no buffer broadcast in forward."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return DDP_OPTIONS
    return {"broadcast_buffers": False}


def build(image_size: int, width: int, device: torch.device, memory_format: torch.memory_format) -> TrainingState:
    spec = ModelSpec("dcgan", 64, 3, image_size, width, num_classes=10)
    state = TrainingState.create(spec, RECIPE, ema_decay=0.99, seed=0)
    device_ids = [device.index] if device.type == "cuda" else None
    state.generator, state.discriminator = (
        DistributedDataParallel(model.to(device, memory_format=memory_format), device_ids=device_ids, **ddp_options())
        for model in (state.generator, state.discriminator))
    state.ema.module.to(device, memory_format=memory_format)
    return state


def measure(row: str, case: tuple[int, int, int], steps: int, device: torch.device) -> dict:
    (image_size, batch, width), (memory_format, autocast_dtype) = case, ROWS[row]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = build(image_size, width, device, memory_format)
    settings = StepSettings(latent_dim=64, loss="non_saturating", num_classes=10, critic_steps=1,
                            gradient_penalty=0.0, r1_gamma=0.0, label_smoothing=0.0, feature_matching=0.0, augment=())
    real = (torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    real = real.to(device, memory_format=memory_format)
    labels = torch.arange(batch, device=device) % 10
    noise, losses = torch.Generator().manual_seed(2), []
    for step in range(WARMUP + steps):
        if step == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        losses.append(state.iteration(real, labels, settings, noise, autocast_dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    finite = all(torch.isfinite(torch.tensor([v for v in entry.values()])).all() for entry in losses)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"images_per_second": steps * batch / elapsed, "finite": bool(finite), "peak_gpu_mb": peak,
            "loss_d": [entry["loss_d"] for entry in losses[:20]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cases", default="32:64:32,32:512:32,64:256:32,64:256:128",
                        help="image_size:batch:model.base_channels per row, comma-separated")
    parser.add_argument("--cpu", action="store_true", help="a dry run on the CPU (gloo); writes no result file")
    args = parser.parse_args()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo" if args.cpu else "nccl", rank=0, world_size=1)
    name = "CPU" if args.cpu else torch.cuda.get_device_name(device)
    print(f"{name}, torch {torch.__version__}, backend {dist.get_backend()}, DDP {ddp_options()}", flush=True)
    report, summaries = results.Report(), {}
    report.line(f"{name}, torch {torch.__version__}; {args.steps} timed steps per row after 10 warm-up steps, "
                f"{args.rounds} interleaved rounds.\n")
    report.line("| image size, batch, width | row | img/s [min, max] |")
    report.line("|---|---|---|")
    for case in args.cases.split(","):
        shape = tuple(map(int, case.split(":")))
        rounds = [{row: measure(row, shape, args.steps, device) for row in ROWS} for _ in range(args.rounds)]
        summaries[case] = summarise(rounds, shape, report)
    dist.destroy_process_group()
    if not args.cpu:
        report.save("gpu-step", {"device": name, "torch": torch.__version__, "cases": summaries},
                    spread=f"median [min, max] over {args.rounds} interleaved rounds")


def summarise(rounds: list[dict], shape: tuple[int, int, int], report: results.Report) -> dict:
    """Median and range of img/s per row, the bf16/float32 ratio within each round, and the checks."""
    speeds = {row: [r[row]["images_per_second"] for r in rounds] for row in ROWS}
    ratios = [r["bf16 + channels-last"]["images_per_second"] / r["float32"]["images_per_second"] for r in rounds]
    drift = max(abs(a - b) for r in rounds
                for a, b in zip(r["float32"]["loss_d"], r["bf16 + channels-last"]["loss_d"]))
    summary = {"speeds": speeds, "ratios": ratios, "loss_d_max_difference_first_20_steps": drift,
               "finite": all(r[row]["finite"] for r in rounds for row in ROWS),
               "peak_gpu_mb": {row: max(r[row]["peak_gpu_mb"] for r in rounds) for row in ROWS}}
    label = f"{shape[0]} px, batch {shape[1]}, width {shape[2]}"
    for row, values in speeds.items():
        report.line(f"| {label} | {row} | {statistics.median(values):.0f} [{min(values):.0f}, {max(values):.0f}] |")
    report.line(f"| {label} | **bf16 + channels-last / float32** | {statistics.median(ratios):.2f} "
                f"[{min(ratios):.2f}, {max(ratios):.2f}]; losses finite: {summary['finite']}; largest loss_d "
                f"difference over the first 20 steps: {drift:.3f} |")
    return summary


if __name__ == "__main__":
    main()
