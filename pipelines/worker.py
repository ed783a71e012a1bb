"""The Ray Train per-worker loop, shared by the tune and train stages.

Each worker streams its share of the train shards from the Ray object store
(`ShardedBatches`), so the data position is a pure function of (seed, step,
rank): a run restored from a checkpoint continues with exactly the batches and
noise it would have seen.
A run that diverges or collapses stops on every worker at the same step and
reports why (`health_error`); the driver then refuses to export it.
"""

from __future__ import annotations

import posixpath
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from gancore.health import (
    TrainingHealthError,
    check_finite,
    check_gradient_norm,
    check_mode_collapse,
    class_coverage,
    class_diversity,
    diversity_ratio,
    gradient_norm_exceeded,
)
from gancore.images import from_uint8
from gancore.metrics.conditional import conditional_accuracy
from gancore.metrics.features import extract, pseudo_classes
from gancore.metrics.fid import frechet_distance, gaussian_statistics
from gancore.models import ModelSpec
from gancore.step import StepSettings, generate_images, requested_labels
from gancore.training import DDP_OPTIONS, OptimizerSettings, TrainingState
from pipelines.artifacts import ArtifactError, load_tensors
from pipelines.config import HealthParams, Params
from pipelines.dataset import ShardedBatches, decode_shard
from pipelines.ray_runtime import quiet_worker_logs

CHECKPOINT_FILE = "checkpoint.pt"
# A run's length, batch, reporting and checks: named as in train.*, which the train stage passes as is.
RUN_BUDGET = ("batch_size", "steps", "log_every", "checkpoint_every", "seed", "health")


def step_noise_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a worker's latents and labels at `step`: a restored run draws exactly the same noise."""
    return seed * 1_000_003 + step * 1_009 + rank


@dataclass(frozen=True)
class LoopConfig:
    """Everything one worker needs; plain data so it pickles to any node. Fields keep their params' names."""

    data: tuple  # ray.ObjectRef per train shard (its .npz bytes), from ray_runtime.put_shards
    shard_counts: tuple[int, ...]  # images per shard
    model: ModelSpec
    step: StepSettings
    lr_g: float  # the optimizer keys stay top-level: tune overrides them per trial
    lr_d: float
    beta1: float
    beta2: float
    batch_size: int
    steps: int
    ema_decay: float
    log_every: int
    checkpoint_every: int
    seed: int
    # Evaluation of EMA samples in featurenet space (domain-FID) and the divergence and mode-collapse checks.
    reference: Any  # ray.ObjectRef of ray_runtime.publish_training_data's reference
    health: HealthParams
    # Where a run with no checkpoint of its own starts: a tune trial's previous interval, or the trial a PBT
    # exploit clones (Ray Train V2 has no resume_from_checkpoint). A ray.train.Checkpoint or None.
    start_checkpoint: Any = field(default=None, kw_only=True)
    autocast: str = field(default="off", kw_only=True)  # train.autocast: auto | bf16 | off

    @classmethod
    def from_params(cls, params: Params, shards: tuple[tuple, tuple[int, ...]], reference: Any, shape: dict,
                    optimizer: dict[str, float], **budget: Any) -> LoopConfig:
        """Model, recipe and EMA from params; `shape` = channels/image_size/num_classes of the prepared data,
        `shards` = (refs, counts) of its train split. `budget` = the RUN_BUDGET fields: train.* for the train
        stage, a trial's own for tune (which so never reads train.steps)."""
        return cls(
            data=tuple(shards[0]), shard_counts=tuple(shards[1]), reference=reference, model=params.model.spec(**shape),
            step=params.model.step_settings(shape["num_classes"]), ema_decay=params.train.ema_decay, **optimizer,
            autocast=params.train.autocast, **budget,
        )

    def images_per_step(self) -> int:
        """Real images one worker reads per generator step (one batch per critic step)."""
        return self.batch_size * self.step.critic_steps

    def optimizer(self) -> OptimizerSettings:
        return OptimizerSettings(lr_g=self.lr_g, lr_d=self.lr_d, beta1=self.beta1, beta2=self.beta2)

    def to_dict(self) -> dict:
        """Shallow: Tune merges trial values into this dict, and the nested specs stay objects."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def describe(self) -> dict:
        """JSON-able summary stored in checkpoints."""
        skip = ("data", "shard_counts", "reference", "start_checkpoint")
        summary = {key: value for key, value in self.to_dict().items() if key not in skip}
        return {**summary, "model": asdict(self.model), "step": asdict(self.step), "health": self.health.model_dump()}


def evaluate_samples(generator: torch.nn.Module, reference: dict, config: LoopConfig, device) -> dict[str, float]:
    """Domain-FID, coverage of the real features' k-means modes, diversity (over all samples and within each
    mode, or each class asked of a conditional model) and a conditional model's accuracy on its labels."""
    num_classes = config.model.num_classes
    fakes = generate_images(generator, config.health.samples, config.model.latent_dim, seed=config.health.seed,
                            device=device, num_classes=num_classes)
    features, probabilities = extract(reference["classifier"], fakes)
    modes = pseudo_classes(features, reference["centroids"])
    requested = requested_labels(len(fakes), num_classes)
    # Within-group diversity: a conditional sample belongs to the class it was asked for, any other to its mode.
    groups, real_groups = ((modes, reference["modes"]) if requested is None
                           else (requested.numpy(), reference["classes"]))
    mu, sigma = gaussian_statistics(features)
    metrics = {
        "fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "class_coverage": class_coverage(modes, len(reference["centroids"])),
        "diversity": diversity_ratio(features, reference["features"]),
        "class_diversity": class_diversity(features, groups, reference["features"], real_groups),
    }
    if requested is not None:
        metrics["conditional_accuracy"] = conditional_accuracy(probabilities.argmax(axis=1), requested.numpy())
    return metrics


def health_problem(step: int, metrics: dict[str, float], health: HealthParams) -> str | None:
    """Why the run at `step` is unhealthy (diverged, exploding gradients, collapsed), or None."""
    try:
        check_finite(step, {key: value for key, value in metrics.items() if key.startswith(("loss_", "grad_norm_"))})
        check_gradient_norm(step, "discriminator", metrics["grad_norm_d"], health.max_grad_norm)
        check_gradient_norm(step, "generator", metrics["grad_norm_g"], health.max_grad_norm)
        if "class_coverage" in metrics and step >= health.warmup_steps:
            # .get: the metrics of a run stopped before these measures existed lack them.
            check_mode_collapse(step, metrics["class_coverage"], metrics["diversity"], health.min_class_coverage,
                                health.min_diversity, class_diversity=metrics.get("class_diversity"),
                                conditional_accuracy=metrics.get("conditional_accuracy"),
                                min_conditional_accuracy=health.min_conditional_accuracy)
    except TrainingHealthError as error:
        return str(error)
    return None


def gradients_exploded(metrics: dict[str, float], health: HealthParams) -> bool:
    """The per-step divergence check. Gradient norms are taken after DDP's all-reduce, so every worker
    sees the same values and reaches the same verdict without communicating; a NaN in any worker's
    loss reaches every worker's gradients through that all-reduce."""
    return any(gradient_norm_exceeded(metrics[key], health.max_grad_norm) for key in ("grad_norm_d", "grad_norm_g"))


def all_workers(value: float, device: torch.device, reduce: str = "max") -> float:
    """`value` over all workers: their "max" or their "mean"."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces only GPU tensors
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if reduce == "max" else dist.ReduceOp.SUM)
    return tensor.item() if reduce == "max" else tensor.item() / dist.get_world_size()


def all_workers_agree(problem: str | None, device: torch.device) -> str | None:
    """The problem if any worker saw one, so that every worker stops at the same step."""
    if all_workers(0.0 if problem is None else 1.0, device) and problem is None:
        return "another worker stopped the run as unhealthy; see its log and the run's last report"
    return problem


def resource_usage(device: torch.device, cpu_seconds: float, wall_seconds: float) -> dict[str, float]:
    """The largest high-water mark over the workers: resident memory, and GPU memory on GPUs (MB); and the
    CPU cores a worker kept busy on average over the window (all its threads; below its CPUs = waiting)."""
    usage = {"cpu_cores_busy": all_workers(cpu_seconds / wall_seconds, device, "mean"),
             "peak_rss_mb": all_workers(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, device)}
    if device.type == "cuda":
        usage["peak_gpu_memory_mb"] = all_workers(torch.cuda.max_memory_allocated(device) / 2**20, device)
    return usage


def save_checkpoint(directory: Path, state: dict) -> ray.train.Checkpoint:
    torch.save(state, directory / CHECKPOINT_FILE)
    return ray.train.Checkpoint.from_directory(str(directory))


def load_checkpoint(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return load_tensors(Path(directory) / CHECKPOINT_FILE, "training checkpoint")


def kept_checkpoints(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's kept checkpoints (train.checkpoints_kept), newest first: `latest`, then the older ones
    beside it (Ray names them checkpoint_<timestamp>, so their names sort by age)."""
    parent = posixpath.dirname(latest.path.rstrip("/"))
    found = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((info.path for info in found if info.type == pyarrow.fs.FileType.Directory
                    and posixpath.basename(info.path).startswith("checkpoint_") and info.path < latest.path),
                   reverse=True)
    return [latest, *(ray.train.Checkpoint(path, latest.filesystem) for path in older)]


def load_newest_readable(latest: ray.train.Checkpoint, rank: int) -> dict:
    """The newest kept checkpoint that loads: a truncated or corrupt newest one (a node lost mid-upload)
    falls back to the one before it instead of failing every retry."""
    problems = []
    for checkpoint in kept_checkpoints(latest):
        try:
            saved = load_checkpoint(checkpoint)
        except (ArtifactError, RuntimeError, EOFError, OSError) as error:
            problems.append(f"{checkpoint.path}: {str(error).strip().splitlines()[0]}")
            continue
        if problems and rank == 0:
            print(f"[train] skipped unreadable checkpoints ({'; '.join(problems)}); resuming from {checkpoint.path}",
                  flush=True)
        return saved
    raise ArtifactError(f"no kept checkpoint of this run can be read ({'; '.join(problems)}); delete the run's folder"
                        " under train.storage_path to start it again")


@dataclass
class Progress:
    """Where a run stands: the next step, the reports so far, and the steps it was restored at."""

    step: int = 0
    history: list = field(default_factory=list)
    restores: list = field(default_factory=list)


def restore(state: TrainingState, config: LoopConfig, rank: int) -> Progress | None:
    """Load the run's latest checkpoint (or the trial a PBT exploit clones) into `state`; None when the
    run ended unhealthy and is still unhealthy by the current limits."""
    own = ray.train.get_checkpoint()
    if own is None and config.start_checkpoint is None:
        return Progress()
    saved = load_newest_readable(own, rank) if own is not None else load_checkpoint(config.start_checkpoint)
    if saved["step"] > config.steps:
        # The run was longer before (e.g. `dvc exp run -S train.steps=500` after 1,500 steps). Its weights
        # are not a `steps`-step model; batches and noise are functions of (seed, step), so training again
        # from step 0 gives exactly the model a `steps`-step run gives.
        if rank == 0:
            print(f"[train] the run's checkpoint is at step {saved['step']}, past steps={config.steps}:"
                  " training from step 0", flush=True)
        return Progress()
    state.load_state_dict(saved)
    # The loaded param groups carry the checkpoint's lr and betas; a PBT exploit goes on with its own.
    state.set_optimizer(config.optimizer())
    torch.set_rng_state(saved["torch_rng"])
    progress = Progress(saved["step"], saved["history"], [*saved.get("restores", []), saved["step"]])
    if saved.get("health_error"):
        # The run stopped as unhealthy. Judged by the current train.health limits: still unhealthy
        # means the same verdict at once; limits relaxed since then means training continues.
        stopped_at = saved.get("health_metrics")
        if stopped_at is None or health_problem(progress.step, stopped_at, config.health) is not None:
            return None
        progress.history = [*progress.history, stopped_at]
    if rank == 0:
        print(f"[train] resumed from the checkpoint at step {progress.step}", flush=True)
    return progress


# train.autocast: auto turns bf16 on only where it was measured to win: on an H200 (docs/benchmarks-history.md,
# "The GPU path"), bf16 + channels-last ran 1.81x float32's speed for a 128-wide G and D at 64 px, and 0.80-0.91x
# for the default 32-wide models at 32 and 64 px.
BF16_MIN_WIDTH, BF16_MIN_SIZE = 128, 64


def autocast_dtype(setting: str, spec: ModelSpec, device: torch.device) -> torch.dtype | None:
    """The forward passes' autocast dtype for train.autocast (`off`: float32, `bf16`: always)."""
    if setting == "bf16":
        return torch.bfloat16
    wins = device.type == "cuda" and spec.base_channels >= BF16_MIN_WIDTH and spec.image_size >= BF16_MIN_SIZE
    return torch.bfloat16 if setting == "auto" and wins else None


def wrap_for_device(state: TrainingState, device: torch.device, spec: ModelSpec,
                    autocast: str) -> tuple[torch.memory_format, torch.dtype | None]:
    """DDP-wrap G and D (separately) and move everything to `device`; the memory format and autocast dtype.

    GPU: channels-last tensors for cuDNN's fastest kernels (train.use_gpu also makes Ray Train use the NCCL
    backend), and bf16 autocast for the forward passes as train.autocast says (autocast_dtype).
    """
    state.generator = ray.train.torch.prepare_model(state.generator, parallel_strategy_kwargs=DDP_OPTIONS)
    state.discriminator = ray.train.torch.prepare_model(state.discriminator, parallel_strategy_kwargs=DDP_OPTIONS)
    state.ema.module.to(device)
    on_gpu = device.type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    for model in (state.generator, state.discriminator, state.ema.module):
        model.to(memory_format=memory_format)
    return memory_format, autocast_dtype(autocast, spec, device)


@dataclass
class WorkerRun:
    """One worker's run once restored and wrapped: what every phase of the loop reads."""

    config: LoopConfig
    state: TrainingState
    progress: Progress
    reference: dict
    batches: ShardedBatches
    device: torch.device
    rank: int
    world_size: int
    memory_format: torch.memory_format
    autocast_dtype: torch.dtype | None
    noise: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))  # re-seeded every step


@dataclass
class Window:
    """The steps since the last report, for img/s and CPU use."""

    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)
    steps: int = 0


def start(config: LoopConfig) -> WorkerRun | None:
    """Build the training state, restore it from the run's checkpoint and wrap it for the device; None
    when the run already ended unhealthy (see restore)."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    state = TrainingState.create(config.model, config.optimizer(), config.ema_decay, config.seed)
    progress = restore(state, config, rank)
    if progress is None:
        return None
    device = ray.train.torch.get_device()
    memory_format, forward_dtype = wrap_for_device(state, device, config.model, config.autocast)
    batches = ShardedBatches(list(config.shard_counts), lambda shard: decode_shard(ray.get(config.data[shard])),
                             config.images_per_step(), config.seed, rank, world_size)
    return WorkerRun(config, state, progress, ray.get(config.reference), batches, device, rank, world_size,
                     memory_format, forward_dtype)


def train_step(run: WorkerRun, step: int) -> dict[str, float]:
    """One G update (and its D updates) on this worker's batch and noise for `step`; its losses and norms."""
    real_images, real_labels = run.batches.batch(step)
    run.noise.manual_seed(step_noise_seed(run.config.seed, step, run.rank))
    return run.state.iteration(
        from_uint8(real_images).to(run.device, memory_format=run.memory_format),
        torch.from_numpy(real_labels).to(run.device) if run.config.model.num_classes else None, run.config.step,
        run.noise, run.autocast_dtype,
    )


def evaluation_due(config: LoopConfig, done: int) -> bool:
    return done % config.health.check_every == 0 or done == config.steps


def report_due(config: LoopConfig, done: int, losses: dict[str, float]) -> bool:
    """Report at log_every, at each evaluation, at the end, and at once when gradients explode."""
    return (done % config.log_every == 0 or done == config.steps or evaluation_due(config, done)
            or gradients_exploded(losses, config.health))


def judge(run: WorkerRun, done: int, losses: dict[str, float], window: Window) -> tuple[dict, str | None]:
    """The report's metrics (losses, speed, resources and, when due, the EMA evaluation) and the verdict that
    every worker shares. Only here do the workers compare, so the steps between reports add no communication."""
    health = run.config.health
    problem = all_workers_agree(health_problem(done, losses, health), run.device)
    elapsed = time.perf_counter() - window.started
    metrics = {"step": done, "images_per_second": window.steps * run.config.images_per_step() * run.world_size / elapsed,
               **losses, **resource_usage(run.device, time.process_time() - window.cpu_started, elapsed)}
    if evaluation_due(run.config, done) and problem is None:
        # Every worker evaluates the same EMA weights on the same latents, so all reach the same verdict.
        metrics.update(evaluate_samples(run.state.ema.module, run.reference, run.config, run.device))
        problem = all_workers_agree(health_problem(done, metrics, health), run.device)
    if problem is None:
        run.progress.history.append(metrics)
    else:
        metrics["health_error"] = problem
    return metrics, problem


def report(run: WorkerRun, metrics: dict, problem: str | None) -> None:
    """ray.train.report on every worker (equally often); rank 0 attaches a checkpoint when one is due.

    An unhealthy stop is checkpointed too: it becomes the run's result (so the driver refuses to
    export it) and a re-run with the same params ends at once instead of training into it again.
    """
    done, config = metrics["step"], run.config
    wants_checkpoint = done % config.checkpoint_every == 0 or done == config.steps or problem is not None
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if wants_checkpoint and run.rank == 0:
            checkpoint = save_checkpoint(Path(directory), {
                **run.state.state_dict(),
                "step": done,
                "history": run.progress.history,
                "torch_rng": torch.get_rng_state(),
                "restores": run.progress.restores,  # steps this run was restored at: provenance of resumed runs
                "health_error": problem,
                "health_metrics": metrics,
                "config": config.describe(),
            })
        ray.train.report(metrics, checkpoint=checkpoint)


def gan_train_loop(raw_config: dict) -> None:
    """Start (restore, wrap), then step; at each report judge health, evaluate, report and checkpoint."""
    quiet_worker_logs()
    run = start(LoopConfig(**raw_config))
    if run is None:
        return
    window = Window()
    for step in range(run.progress.step, run.config.steps):
        losses = train_step(run, step)
        window.steps += 1
        if not report_due(run.config, step + 1, losses):
            continue
        metrics, problem = judge(run, step + 1, losses, window)
        report(run, metrics, problem)
        if problem is not None:
            return
        window = Window()
