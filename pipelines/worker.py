"""The Ray Train per-worker loop, shared by the tune and train stages.

Each worker streams its share of the train shards from the Ray object store
(`ShardedBatches`), so the data position is a pure function of (seed, step,
rank): a run restored from a checkpoint continues with exactly the batches and
noise it would have seen.
A run that diverges or collapses stops on every worker at the same step and
reports why (`health_error`); the driver then refuses to export it.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
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
from gancore.metrics.features import extract
from gancore.metrics.fid import frechet_distance, gaussian_statistics
from gancore.models import ModelSpec
from gancore.models.classifier import Classifier
from gancore.step import StepSettings, generate_images, requested_labels
from gancore.training import OptimizerSettings, TrainingState
from pipelines.artifacts import load_featurenet, load_tensors
from pipelines.config import Params
from pipelines.dataset import ShardedBatches, decode_shard, load_split, model_shape, read_manifest, shard_files
from pipelines.ray_runtime import put_shards, quiet_worker_logs

CHECKPOINT_FILE = "checkpoint.pt"
REFERENCE_IMAGES = 10_000  # held-out images whose features the domain-FID compares against (memory-bounded)
EVAL_SEED = 12345  # the same latents at every evaluation, so the FID curve tracks the model, not the noise
# G and D are wrapped separately; D runs twice per update (real, fake) before
# backward, which only works when DDP does not re-broadcast BN buffers per forward.
DDP_OPTIONS = {"forward_sync_buffers": False}


def step_noise_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a worker's latents and labels at `step`: a restored run draws exactly the same noise."""
    return seed * 1_000_003 + step * 1_009 + rank


@dataclass(frozen=True)
class LoopConfig:
    """Everything one worker needs; plain data so it pickles to any node."""

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
    report_every: int
    checkpoint_every: int  # 0: never checkpoint (tune trials)
    seed: int
    # Evaluation of EMA samples in featurenet space: domain-FID and the mode-collapse check.
    reference: Any  # ray.ObjectRef of real_feature_reference(...)
    eval_every: int
    eval_samples: int
    max_grad_norm: float
    collapse_warmup: int
    min_class_coverage: float
    min_diversity: float
    min_conditional_accuracy: float
    # Where a run with no checkpoint of its own starts: a tune trial's previous interval, or the trial a PBT
    # exploit clones (Ray Train V2 has no resume_from_checkpoint). A ray.train.Checkpoint or None.
    start_checkpoint: Any = field(default=None, kw_only=True)

    @classmethod
    def from_params(cls, params: Params, shards: tuple[tuple, tuple[int, ...]], reference: Any, shape: dict,
                    optimizer: dict[str, float], **budget: Any) -> LoopConfig:
        """Model, recipe, batch and health limits from params; `shape` = channels/image_size/num_classes of the
        prepared data and `shards` = (refs, counts) of its train split; the budget (steps, reporting,
        evaluation, seed, and a per-worker batch_size other than train.batch_size) from the caller."""
        health = params.train.health
        return cls(
            data=tuple(shards[0]), shard_counts=tuple(shards[1]), reference=reference, model=params.model.spec(**shape),
            step=params.model.step_settings(shape["num_classes"]),
            batch_size=budget.pop("batch_size", params.train.batch_size),
            ema_decay=params.train.ema_decay, max_grad_norm=health.max_grad_norm,
            collapse_warmup=health.warmup_steps, min_class_coverage=health.min_class_coverage,
            min_diversity=health.min_diversity, min_conditional_accuracy=health.min_conditional_accuracy,
            **optimizer, **budget,
        )

    def optimizer(self) -> OptimizerSettings:
        return OptimizerSettings(lr_g=self.lr_g, lr_d=self.lr_d, beta1=self.beta1, beta2=self.beta2)

    def to_dict(self) -> dict:
        """Shallow: Tune merges trial values into this dict, and the nested specs stay dataclasses."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def describe(self) -> dict:
        """JSON-able summary stored in checkpoints."""
        skip = ("data", "shard_counts", "reference", "start_checkpoint")
        return {key: asdict(value) if key in ("model", "step") else value
                for key, value in self.to_dict().items() if key not in skip}


def evaluate_samples(generator: torch.nn.Module, reference: dict, config: LoopConfig, device) -> dict[str, float]:
    """Domain-FID, class coverage, diversity (over all samples and within each class) and, for a conditional
    model, conditional accuracy of EMA samples against the real reference."""
    num_classes = config.model.num_classes
    fakes = generate_images(generator, config.eval_samples, config.model.latent_dim, seed=EVAL_SEED, device=device,
                            num_classes=num_classes)
    features, probabilities = extract(reference["classifier"], fakes)
    predicted = probabilities.argmax(axis=1)
    requested = requested_labels(len(fakes), num_classes)
    # A conditional sample belongs to the class it was asked for; an unconditional one to featurenet's guess.
    classes = predicted if requested is None else requested.numpy()
    mu, sigma = gaussian_statistics(features)
    metrics = {
        "fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "class_coverage": class_coverage(predicted, probabilities.shape[1]),
        "diversity": diversity_ratio(features, reference["features"]),
        "class_diversity": class_diversity(features, classes, reference["features"], reference["classes"]),
    }
    if requested is not None:
        metrics["conditional_accuracy"] = conditional_accuracy(predicted, classes)
    return metrics


def health_problem(step: int, metrics: dict[str, float], config: LoopConfig) -> str | None:
    """Why the run at `step` is unhealthy (diverged, exploding gradients, collapsed), or None."""
    try:
        check_finite(step, {key: value for key, value in metrics.items() if key.startswith(("loss_", "grad_norm_"))})
        check_gradient_norm(step, "discriminator", metrics["grad_norm_d"], config.max_grad_norm)
        check_gradient_norm(step, "generator", metrics["grad_norm_g"], config.max_grad_norm)
        if "class_coverage" in metrics and step >= config.collapse_warmup:
            # .get: the metrics of a run stopped before these measures existed lack them.
            check_mode_collapse(step, metrics["class_coverage"], metrics["diversity"], config.min_class_coverage,
                                config.min_diversity, class_diversity=metrics.get("class_diversity"),
                                conditional_accuracy=metrics.get("conditional_accuracy"),
                                min_conditional_accuracy=config.min_conditional_accuracy)
    except TrainingHealthError as error:
        return str(error)
    return None


def gradients_exploded(metrics: dict[str, float], config: LoopConfig) -> bool:
    """The per-step divergence check. Gradient norms are taken after DDP's all-reduce, so every worker
    sees the same values and reaches the same verdict without communicating; a NaN in any worker's
    loss reaches every worker's gradients through that all-reduce."""
    return any(gradient_norm_exceeded(metrics[key], config.max_grad_norm) for key in ("grad_norm_d", "grad_norm_g"))


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


@dataclass
class Progress:
    """Where a run stands: the next step, the reports so far, and the steps it was restored at."""

    step: int = 0
    history: list = field(default_factory=list)
    restores: list = field(default_factory=list)


def restore(state: TrainingState, config: LoopConfig, rank: int) -> Progress | None:
    """Load the run's latest checkpoint (or the trial a PBT exploit clones) into `state`; None when the
    run ended unhealthy and is still unhealthy by the current limits."""
    checkpoint = ray.train.get_checkpoint() or config.start_checkpoint
    if checkpoint is None:
        return Progress()
    saved = load_checkpoint(checkpoint)
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
        if stopped_at is None or health_problem(progress.step, stopped_at, config) is not None:
            return None
        progress.history = [*progress.history, stopped_at]
    if rank == 0:
        print(f"[train] resumed from the checkpoint at step {progress.step}", flush=True)
    return progress


def wrap_for_device(state: TrainingState, device: torch.device) -> tuple[torch.memory_format, torch.dtype | None]:
    """DDP-wrap G and D (separately) and move everything to `device`; the memory format and autocast dtype.

    GPU: bf16 autocast for the forward passes and channels-last tensors for cuDNN's fastest kernels
    (train.use_gpu also makes Ray Train use the NCCL backend). CPU runs stay in float32.
    """
    state.generator = ray.train.torch.prepare_model(state.generator, parallel_strategy_kwargs=DDP_OPTIONS)
    state.discriminator = ray.train.torch.prepare_model(state.discriminator, parallel_strategy_kwargs=DDP_OPTIONS)
    state.ema.module.to(device)
    on_gpu = device.type == "cuda"
    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    for model in (state.generator, state.discriminator, state.ema.module):
        model.to(memory_format=memory_format)
    return memory_format, torch.bfloat16 if on_gpu else None


def report(state: TrainingState, progress: Progress, metrics: dict, problem: str | None, config: LoopConfig,
           rank: int) -> None:
    """ray.train.report on every worker (equally often); rank 0 attaches a checkpoint when one is due.

    An unhealthy stop is checkpointed too: it becomes the run's result (so the driver refuses to
    export it) and a re-run with the same params ends at once instead of training into it again.
    """
    done = metrics["step"]
    wants_checkpoint = config.checkpoint_every and (
        done % config.checkpoint_every == 0 or done == config.steps or problem is not None)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if wants_checkpoint and rank == 0:
            checkpoint = save_checkpoint(Path(directory), {
                **state.state_dict(),
                "step": done,
                "history": progress.history,
                "torch_rng": torch.get_rng_state(),
                "restores": progress.restores,  # steps this run was restored at: provenance of resumed runs
                "health_error": problem,
                "health_metrics": metrics,
                "config": config.describe(),
            })
        ray.train.report(metrics, checkpoint=checkpoint)


def gan_train_loop(raw_config: dict) -> None:
    """Restore, wrap, then step; at each report judge health, evaluate, report and checkpoint."""
    quiet_worker_logs()
    config = LoopConfig(**raw_config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    reference = ray.get(config.reference)
    state = TrainingState.create(config.model, config.optimizer(), config.ema_decay, config.seed)
    progress = restore(state, config, rank)
    if progress is None:
        return
    memory_format, autocast_dtype = wrap_for_device(state, device)
    images_per_step = config.batch_size * config.step.critic_steps
    batches = ShardedBatches(list(config.shard_counts), lambda shard: decode_shard(ray.get(config.data[shard])),
                             images_per_step, config.seed, rank, world_size)
    noise = torch.Generator(device="cpu")
    window_start, window_cpu, window_steps = time.perf_counter(), time.process_time(), 0
    for step in range(progress.step, config.steps):
        real_images, real_labels = batches.batch(step)
        noise.manual_seed(step_noise_seed(config.seed, step, rank))
        losses = state.iteration(
            from_uint8(real_images).to(device, memory_format=memory_format),
            torch.from_numpy(real_labels).to(device) if config.model.num_classes else None, config.step,
            noise, autocast_dtype,
        )
        window_steps, done = window_steps + 1, step + 1
        wants_eval = config.eval_every and (done % config.eval_every == 0 or done == config.steps)
        if (done % config.report_every and done != config.steps and not wants_eval
                and not gradients_exploded(losses, config)):
            continue

        # Only here do the workers compare verdicts, so the steps between reports add no communication.
        problem = all_workers_agree(health_problem(done, losses, config), device)
        elapsed = time.perf_counter() - window_start
        metrics = {"step": done, "images_per_second": window_steps * images_per_step * world_size / elapsed,
                   **losses, **resource_usage(device, time.process_time() - window_cpu, elapsed)}
        if wants_eval and problem is None:
            # Every worker evaluates the same EMA weights on the same latents, so all reach the same verdict.
            metrics.update(evaluate_samples(state.ema.module, reference, config, device))
            problem = all_workers_agree(health_problem(done, metrics, config), device)
        if problem is None:
            progress.history.append(metrics)
        else:
            metrics["health_error"] = problem
        report(state, progress, metrics, problem, config, rank)
        if problem is not None:
            return
        window_start, window_cpu, window_steps = time.perf_counter(), time.process_time(), 0


def real_feature_reference(classifier: Classifier, images: np.ndarray, labels: np.ndarray,
                           diversity_samples: int = 1000) -> dict:
    """Featurenet, the Gaussian statistics of real images (domain-FID) and a sample of their features with
    their labels (diversity, over all and within each class)."""
    features, _ = extract(classifier, from_uint8(images))
    mu, sigma = gaussian_statistics(features)
    keep = np.random.default_rng(0).permutation(len(features))[:diversity_samples]
    return {"classifier": classifier.cpu().eval(), "mu": mu, "sigma": sigma, "features": features[keep],
            "classes": labels[keep]}


def publish_training_data(prepared: Path) -> tuple[tuple[tuple, tuple[int, ...]], Any, dict[str, int]]:
    """What tune and train hand their workers: the train shards in the object store, the domain-FID
    reference (featurenet + held-out statistics) as an object, and the model shape of the data."""
    test_images, test_labels = load_split(prepared, "test", limit=REFERENCE_IMAGES)
    reference = ray.put(real_feature_reference(load_featurenet(), test_images, test_labels))
    return put_shards(shard_files(prepared, "train")), reference, model_shape(read_manifest(prepared))
