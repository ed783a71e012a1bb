import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gancore.ema import ExponentialMovingAverage
from gancore.losses import LOSSES, discriminator_loss, generator_loss
from gancore.models import build_gan
from gancore.step import sample_latent, train_step

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_loss_names():
    assert LOSSES == ("non_saturating", "minimax", "hinge", "wasserstein", "least_squares")


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("non_saturating", (softplus(-2) + softplus(1)) / 2 + (softplus(0.5) + softplus(-3)) / 2),
        ("minimax", (softplus(-2) + softplus(1)) / 2 + (softplus(0.5) + softplus(-3)) / 2),
        ("hinge", (0.0 + 2.0) / 2 + (1.5 + 0.0) / 2),
        ("wasserstein", (0.5 - 3.0) / 2 - (2.0 - 1.0) / 2),
        ("least_squares", 0.5 * (1.0 + 4.0) / 2 + 0.5 * (0.25 + 9.0) / 2),
    ],
)
def test_discriminator_loss_values(kind, expected):
    assert discriminator_loss(kind, REAL, FAKE).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("non_saturating", (softplus(-0.5) + softplus(3)) / 2),
        ("minimax", (math.log(1 - 1 / (1 + math.exp(-0.5))) + math.log(1 - 1 / (1 + math.exp(3)))) / 2),
        ("hinge", 1.25),
        ("wasserstein", 1.25),
        ("least_squares", 0.5 * (0.25 + 16.0) / 2),
    ],
)
def test_generator_loss_values(kind, expected):
    assert generator_loss(kind, FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_losses_are_stable_for_extreme_logits():
    big = torch.tensor([1e4, -1e4])
    for kind in LOSSES:
        assert torch.isfinite(discriminator_loss(kind, big, -big))
        assert torch.isfinite(generator_loss(kind, big))


def test_unknown_loss():
    with pytest.raises(ValueError, match="hinge"):
        discriminator_loss("relativistic", REAL, FAKE)
    with pytest.raises(ValueError, match="hinge"):
        generator_loss("relativistic", FAKE)


def test_sample_latent_seeded():
    a = sample_latent(4, 8, "cpu", torch.Generator().manual_seed(1))
    b = sample_latent(4, 8, "cpu", torch.Generator().manual_seed(1))
    assert a.shape == (4, 8)
    torch.testing.assert_close(a, b)


def _setup(seed: int = 0, image_size: int = 16):
    torch.manual_seed(seed)
    generator, discriminator = build_gan("dcgan", 8, 1, image_size, 8)
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return generator, discriminator, g_opt, d_opt


@pytest.mark.parametrize("kind", LOSSES)
def test_train_step_updates_both_models(kind):
    generator, discriminator, g_opt, d_opt = _setup()
    g_before = [p.detach().clone() for p in generator.parameters()]
    d_before = [p.detach().clone() for p in discriminator.parameters()]
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    out = train_step(generator, discriminator, g_opt, d_opt, real, 8, kind)
    assert set(out) == {"loss_d", "loss_g", "d_real", "d_fake"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, p) for a, p in zip(g_before, generator.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(d_before, discriminator.parameters()))


def test_train_step_reports_d_step_values():
    generator, discriminator, g_opt, d_opt = _setup()
    generator_ref, discriminator_ref = copy.deepcopy(generator), copy.deepcopy(discriminator)
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    out = train_step(generator, discriminator, g_opt, d_opt, real, 8, "hinge", torch.Generator().manual_seed(5))

    # Recompute the D-step logits from the pre-step weights and the same latents.
    with torch.no_grad():
        fake = generator_ref(sample_latent(8, 8, "cpu", torch.Generator().manual_seed(5)))
        real_logits, fake_logits = discriminator_ref(real), discriminator_ref(fake)
    assert out["d_real"] == pytest.approx(real_logits.mean().item(), rel=1e-5, abs=1e-6)
    assert out["d_fake"] == pytest.approx(fake_logits.mean().item(), rel=1e-5, abs=1e-6)
    assert out["loss_d"] == pytest.approx(discriminator_loss("hinge", real_logits, fake_logits).item(), rel=1e-5)


def test_train_step_deterministic():
    def run():
        generator, discriminator, g_opt, d_opt = _setup(seed=3)
        noise = torch.Generator().manual_seed(7)
        real = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
        return [train_step(generator, discriminator, g_opt, d_opt, real, 8, "non_saturating", noise) for _ in range(3)]

    assert run() == run()


def test_discriminator_learns_toy_problem():
    # A fixed striped "real" batch is easy to tell apart from an untrained generator's output.
    generator, discriminator, g_opt, d_opt = _setup(seed=1)
    g_opt.param_groups[0]["lr"] = 0.0  # hold G still so D's loss must fall
    d_opt.param_groups[0]["lr"] = 2e-3
    real = torch.zeros(8, 1, 16, 16)
    real[:, :, ::2] = 1.0
    real[:, :, 1::2] = -1.0
    noise = torch.Generator().manual_seed(0)
    losses = [train_step(generator, discriminator, g_opt, d_opt, real, 8, "non_saturating", noise) for _ in range(10)]
    assert all(math.isfinite(v) for step in losses for v in step.values())
    assert losses[-1]["loss_d"] < 0.5 * losses[0]["loss_d"]
    assert losses[-1]["d_real"] > losses[-1]["d_fake"]


def test_train_step_leaves_no_generator_grad_in_d_step():
    # G must not receive gradients from the D update (fakes are detached).
    generator, discriminator, g_opt, d_opt = _setup()
    seen = []
    for p in generator.parameters():
        p.register_hook(lambda g: seen.append(1) or g)
    train_step(generator, discriminator, g_opt, d_opt, torch.zeros(4, 1, 16, 16), 8, "hinge")
    # Only the G step's single backward reaches G's parameters.
    assert len(seen) == len(list(generator.parameters()))


def test_train_step_and_ema_under_ddp(tmp_path):
    # Single-process gloo group: exercises DDP's reducer with D called twice per D step.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        generator, discriminator, g_opt, d_opt = _setup()
        ddp_generator = DistributedDataParallel(generator)
        ddp_discriminator = DistributedDataParallel(discriminator, forward_sync_buffers=False)
        ema = ExponentialMovingAverage(ddp_generator, 0.0)
        real = torch.rand(4, 1, 16, 16) * 2 - 1
        for _ in range(2):
            out = train_step(ddp_generator, ddp_discriminator, g_opt, d_opt, real, 8, "hinge")
            assert all(math.isfinite(v) for v in out.values())
        ema.update(ddp_generator)
        for ema_p, p in zip(ema.module.parameters(), generator.parameters()):
            torch.testing.assert_close(ema_p, p)
    finally:
        dist.destroy_process_group()


def test_generate_images_is_seeded_and_batched():
    from gancore.models import build_gan
    from gancore.step import generate_images

    torch.manual_seed(0)
    generator, _ = build_gan("dcgan", 8, 1, 16, 8)
    generator.eval()
    first = generate_images(generator, 10, 8, seed=3, batch_size=4)
    assert first.shape == (10, 1, 16, 16)
    assert torch.equal(first, generate_images(generator, 10, 8, seed=3, batch_size=4)), "same seed, same images"
    assert not torch.equal(first, generate_images(generator, 10, 8, seed=4, batch_size=4))
