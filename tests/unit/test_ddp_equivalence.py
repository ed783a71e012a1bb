"""Data parallelism must not change the math: 2 DDP workers with batch B take the same step as 1 with 2B.

Holds for models without batch statistics (BatchNorm normalises per worker, by design), so G is the
MLP generator and D the WGAN-GP critic (layer norm). G and D are wrapped separately, as the Ray
worker wraps them. Latents are fixed per global sample so both runs see the same noise.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import gancore.step
from gancore.models import ModelSpec, build_gan
from gancore.step import StepSettings, train_step

BATCH, LATENT, STEPS = 4, 8, 3
SETTINGS = StepSettings(latent_dim=LATENT, loss="non_saturating", num_classes=0, critic_steps=2,
                        gradient_penalty=0.0, r1_gamma=0.0, label_smoothing=0.0, feature_matching=0.0, augment=())


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    generator, _ = build_gan(ModelSpec("mlp", LATENT, 1, 16, 8))
    _, critic = build_gan(ModelSpec("wgan_gp", LATENT, 1, 16, 8))
    return generator, critic


def global_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Real images per step and the latents of every sample_latent call, for the global batch of 2B."""
    data = torch.Generator().manual_seed(1)
    real = torch.rand(STEPS, SETTINGS.critic_steps * 2 * BATCH, 1, 16, 16, generator=data) * 2 - 1
    calls_per_step = SETTINGS.critic_steps + 1
    latents = torch.randn(STEPS * calls_per_step, 2 * BATCH, LATENT, generator=data)
    return real, latents


def run(rank: int, world_size: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        real, latents = global_batches()
        calls = iter(latents)

        def this_workers_latents(n, latent_dim, device, noise_generator=None):
            return next(calls)[rank * n : (rank + 1) * n]

        gancore.step.sample_latent = this_workers_latents
        generator, critic = models()
        g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
        d_opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.999))
        ddp_generator = DistributedDataParallel(generator)
        ddp_critic = DistributedDataParallel(critic, forward_sync_buffers=False)
        per_worker = SETTINGS.critic_steps * BATCH * 2 // world_size
        for step in range(STEPS):
            # Each critic chunk of the global batch is split between the workers.
            chunks = real[step].view(SETTINGS.critic_steps, 2 * BATCH, 1, 16, 16)
            mine = chunks[:, rank * (2 * BATCH // world_size) : (rank + 1) * (2 * BATCH // world_size)]
            train_step(ddp_generator, ddp_critic, g_opt, d_opt, mine.reshape(per_worker, 1, 16, 16), None, SETTINGS)
        if rank == 0:
            torch.save({"generator": generator.state_dict(), "critic": critic.state_dict()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_workers_with_batch_b_equal_one_worker_with_batch_2b(tmp_path):
    results = {}
    for world_size in (1, 2):
        out = tmp_path / f"world{world_size}.pt"
        mp.spawn(run, args=(world_size, str(tmp_path / f"rendezvous{world_size}"), str(out)), nprocs=world_size)
        results[world_size] = torch.load(out)
    untrained = dict(zip(("generator", "critic"), (m.state_dict() for m in models())))
    for part in ("generator", "critic"):
        for name, single in results[1][part].items():
            torch.testing.assert_close(results[2][part][name], single, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")
        moved = any(not torch.equal(results[1][part][name], untrained[part][name]) for name in untrained[part])
        assert moved, f"the {part} must have been trained for the comparison to mean anything"
