"""The Ray Train per-worker loop, shared by the tune and train stages.

Each worker draws its own slice of every epoch's permutation, so the data
position is a pure function of (seed, step, rank): a run restored from a
checkpoint continues with exactly the batches and noise it would have seen.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from gancore.ema import ExponentialMovingAverage, unwrap
from gancore.images import from_uint8
from gancore.metrics.features import extract
from gancore.metrics.fid import frechet_distance, gaussian_statistics
from gancore.models import build_gan
from gancore.models.classifier import Classifier
from gancore.step import generate_images, train_step
from pipelines.config import Params
from pipelines.ray_runtime import quiet_worker_logs

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class LoopConfig:
    """Everything one worker needs; plain data so it pickles to any node."""

    images: Any  # ray.ObjectRef of uint8 (N, H, W, C)
    family: str
    latent_dim: int
    base_channels: int
    loss: str
    lr_g: float
    lr_d: float
    beta1: float
    beta2: float
    batch_size: int
    steps: int
    ema_decay: float
    report_every: int
    checkpoint_every: int  # 0: never checkpoint (tune trials)
    seed: int
    # Domain-FID reports (tune): featurenet weights + real feature statistics.
    fid_reference: Any = None  # ray.ObjectRef of dict(classifier=..., mu=..., sigma=...)
    fid_samples: int = 0

    @classmethod
    def from_params(cls, params: Params, images: Any, optimizer: dict[str, float], **budget: Any) -> LoopConfig:
        """Model and per-worker batch from params; the budget (steps, reporting, seed) from the caller."""
        return cls(images=images, family=params.model.family, latent_dim=params.model.latent_dim,
                   base_channels=params.model.base_channels, loss=params.model.loss,
                   batch_size=params.train.batch_size, ema_decay=params.train.ema_decay, **optimizer, **budget)

    def to_dict(self) -> dict:
        return asdict(self)


def batch_indices(num_images: int, batch_size: int, step: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of this worker's batch at `step`: epoch-wise permutation, rank-strided."""
    per_worker = num_images // world_size
    steps_per_epoch = per_worker // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_images} training images cannot fill one batch of {batch_size} on each of "
            f"{world_size} workers; lower train.batch_size or train.num_workers"
        )
    epoch, position = divmod(step, steps_per_epoch)
    permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    shard = permutation[rank : per_worker * world_size : world_size]
    return shard[position * batch_size : (position + 1) * batch_size]


def domain_fid(generator: torch.nn.Module, reference: dict, num_samples: int, latent_dim: int, device) -> float:
    fakes = generate_images(generator, num_samples, latent_dim, seed=12345, device=device)
    mu, sigma = gaussian_statistics(extract(reference["classifier"], fakes)[0])
    return frechet_distance(mu, sigma, reference["mu"], reference["sigma"])


def save_checkpoint(directory: Path, state: dict) -> ray.train.Checkpoint:
    torch.save(state, directory / CHECKPOINT_FILE)
    return ray.train.Checkpoint.from_directory(str(directory))


def load_checkpoint(checkpoint: ray.train.Checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def gan_train_loop(raw_config: dict) -> None:
    quiet_worker_logs()
    config = LoopConfig(**raw_config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # identical initial weights on every worker

    images = from_uint8(ray.get(config.images))
    generator, discriminator = build_gan(
        config.family, config.latent_dim, images.shape[1], images.shape[2], config.base_channels
    )
    ema = ExponentialMovingAverage(generator, config.ema_decay)
    betas = (config.beta1, config.beta2)
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=betas)
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.lr_d, betas=betas)

    start_step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        ema.module.load_state_dict(state["generator_ema"])
        generator_optimizer.load_state_dict(state["generator_optimizer"])
        discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        start_step, history = state["step"], state["history"]
        torch.set_rng_state(state["torch_rng"])

    # G and D are wrapped separately; D runs twice per update (real, fake) before
    # backward, which only works when DDP does not re-broadcast BN buffers per forward.
    ddp_options = {"parallel_strategy_kwargs": {"forward_sync_buffers": False}}
    generator = ray.train.torch.prepare_model(generator, **ddp_options)
    discriminator = ray.train.torch.prepare_model(discriminator, **ddp_options)
    ema.module.to(device)

    noise = torch.Generator(device="cpu")
    window_start, window_steps = time.perf_counter(), 0
    for step in range(start_step, config.steps):
        index = batch_indices(len(images), config.batch_size, step, config.seed, rank, world_size)
        noise.manual_seed(config.seed * 1_000_003 + step * 1_009 + rank)
        losses = train_step(
            generator, discriminator, generator_optimizer, discriminator_optimizer,
            images[index].to(device), config.latent_dim, config.loss, noise_generator=noise,
        )
        ema.update(generator)
        window_steps += 1
        done = step + 1
        if done % config.report_every and done != config.steps:
            continue

        elapsed = time.perf_counter() - window_start
        metrics = {
            "step": done,
            "images_per_second": window_steps * config.batch_size * world_size / elapsed,
            **losses,
        }
        if config.fid_reference is not None and rank == 0:
            metrics["fid"] = domain_fid(ema.module, ray.get(config.fid_reference), config.fid_samples,
                                        config.latent_dim, device)
        history.append(metrics)
        wants_checkpoint = config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if wants_checkpoint and rank == 0:
                checkpoint = save_checkpoint(Path(directory), {
                    "generator": unwrap(generator).state_dict(),
                    "discriminator": unwrap(discriminator).state_dict(),
                    "generator_ema": ema.module.state_dict(),
                    "generator_optimizer": generator_optimizer.state_dict(),
                    "discriminator_optimizer": discriminator_optimizer.state_dict(),
                    "step": done,
                    "history": history,
                    "torch_rng": torch.get_rng_state(),
                    "config": {k: v for k, v in config.to_dict().items() if k not in ("images", "fid_reference")},
                })
            # Every worker reports equally often; only rank 0 carries the checkpoint.
            ray.train.report(metrics, checkpoint=checkpoint)
        window_start, window_steps = time.perf_counter(), 0


def real_feature_reference(classifier: Classifier, images: np.ndarray) -> dict:
    """Featurenet plus the Gaussian statistics of real images, for domain-FID reports."""
    features, _ = extract(classifier, from_uint8(images))
    mu, sigma = gaussian_statistics(features)
    return {"classifier": classifier.cpu().eval(), "mu": mu, "sigma": sigma}
