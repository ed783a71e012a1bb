import copy
import gc
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gancore.ema import ExponentialMovingAverage
from gancore.losses import LOSSES, SMOOTHABLE, discriminator_loss, generator_loss
from gancore.models import ModelSpec, build_gan
from gancore.regularizers import feature_matching_loss, gradient_penalty, r1_penalty
from gancore.step import (StepSettings, generate_images, mode_seeking_loss, requested_labels, sample_latent,
                          train_step)

REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


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


def test_one_sided_label_smoothing_moves_only_the_real_target():
    smoothed = discriminator_loss("non_saturating", REAL, FAKE, real_target=0.9)
    real_term = (0.9 * softplus(-2) + 0.1 * softplus(2) + 0.9 * softplus(1) + 0.1 * softplus(-1)) / 2
    assert smoothed.item() == pytest.approx(real_term + (softplus(0.5) + softplus(-3)) / 2, rel=1e-6)
    least_squares = discriminator_loss("least_squares", REAL, FAKE, real_target=0.9)
    assert least_squares.item() == pytest.approx(0.5 * (1.1**2 + 1.9**2) / 2 + 0.5 * (0.25 + 9.0) / 2, rel=1e-6)
    assert set(SMOOTHABLE) == {"non_saturating", "minimax", "least_squares"}
    with pytest.raises(ValueError, match="label smoothing"):
        discriminator_loss("hinge", REAL, FAKE, real_target=0.9)


class LinearCritic(torch.nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere, so the penalties have closed forms."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x, labels=None):
        return x.flatten(1) @ self.weight


def test_gradient_penalty_and_r1_closed_forms():
    critic = LinearCritic(torch.tensor([3.0, 4.0, 0.0, 0.0]))  # ||w|| = 5
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    penalty = gradient_penalty(critic, real, fake, None, torch.rand(6))
    assert penalty.item() == pytest.approx((5.0 - 1.0) ** 2)
    assert r1_penalty(critic, real, None).item() == pytest.approx(25.0)
    penalty.backward()  # the penalty trains D: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    torch.testing.assert_close(critic.weight.grad, 2 * 4 * torch.tensor([3.0, 4.0, 0.0, 0.0]) / 5)


def test_feature_matching_is_the_squared_distance_of_feature_means():
    real = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    fake = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(1.0 + 4.0)
    loss.backward()
    assert fake.grad is not None and torch.all(fake.grad <= 0), "fake features are pulled toward the real mean"


def settings(**changes) -> StepSettings:
    base = {"latent_dim": 8, "loss": "non_saturating", "num_classes": 0, "critic_steps": 1, "gradient_penalty": 0.0,
            "r1_gamma": 0.0, "label_smoothing": 0.0, "feature_matching": 0.0, "augment": ()}
    return StepSettings(**{**base, **changes})


def _setup(seed: int = 0, family: str = "dcgan", num_classes: int = 0, **spec):
    torch.manual_seed(seed)
    generator, discriminator = build_gan(ModelSpec(family, 8, 1, 16, 8, num_classes=num_classes, **spec))
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return generator, discriminator, g_opt, d_opt


RECIPES = {
    **{f"dcgan-{kind}": ({}, {"loss": kind}) for kind in LOSSES},
    "mlp-minibatch-discrimination": ({"family": "mlp", "minibatch_discrimination": True}, {}),
    "wgan-gp": ({"family": "wgan_gp"}, {"loss": "wasserstein", "gradient_penalty": 10.0, "critic_steps": 3}),
    "sngan-conditional-hinge-r1": ({"family": "sngan", "num_classes": 10}, {"loss": "hinge", "r1_gamma": 1.0,
                                                                          "num_classes": 10}),
    "dcgan-salimans-diffaugment": ({"spectral_norm": True}, {"label_smoothing": 0.1, "feature_matching": 1.0,
                                                            "augment": ("color", "translation", "cutout")}),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_both_models_reproducibly(recipe):
    spec, changes = RECIPES[recipe]
    step = settings(**changes)

    def run():
        generator, discriminator, g_opt, d_opt = _setup(**spec)
        before = [copy.deepcopy(m.state_dict()) for m in (generator, discriminator)]
        noise = torch.Generator().manual_seed(7)
        data = torch.Generator().manual_seed(9)
        real = torch.rand(8 * step.critic_steps, 1, 16, 16, generator=data) * 2 - 1
        labels = torch.randint(10, (len(real),), generator=data) if step.num_classes else None
        out = [train_step(generator, discriminator, g_opt, d_opt, real, labels, step, noise) for _ in range(2)]
        changed = [any(not torch.equal(old[k], new) for k, new in m.state_dict().items())
                   for old, m in zip(before, (generator, discriminator))]
        return out, changed, d_opt

    out, changed, d_opt = run()
    assert set(out[0]) == {"loss_d", "loss_g", "d_real", "d_fake", "d_real_sign", "grad_norm_d",
                          "grad_norm_g"}
    assert all(math.isfinite(v) for row in out for v in row.values())
    assert changed == [True, True], "both G and D are updated"
    adam_steps = next(iter(d_opt.state.values()))["step"].item()
    assert adam_steps == 2 * step.critic_steps, "D is updated critic_steps times per G step"
    assert run()[0] == out, "same seed and params on CPU give identical losses"


def test_bf16_autocast_step_tracks_the_float32_step():
    """The GPU path's mixed precision, exercised on CPU: same step, losses within bf16 rounding."""
    step = settings(loss="hinge", gradient_penalty=1.0)

    def losses(dtype):
        generator, discriminator, g_opt, d_opt = _setup(family="wgan_gp")
        real = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
        return train_step(generator, discriminator, g_opt, d_opt, real, None, step, torch.Generator().manual_seed(7),
                          autocast_dtype=dtype)

    full, mixed = losses(None), losses(torch.bfloat16)
    assert all(math.isfinite(value) for value in mixed.values())
    assert mixed["loss_d"] == pytest.approx(full["loss_d"], rel=0.05, abs=0.02)
    assert mixed["loss_g"] == pytest.approx(full["loss_g"], rel=0.05, abs=0.02)


def test_conditional_step_needs_labels_and_even_critic_chunks():
    generator, discriminator, g_opt, d_opt = _setup(num_classes=10)
    with pytest.raises(ValueError, match="labels"):
        train_step(generator, discriminator, g_opt, d_opt, torch.zeros(4, 1, 16, 16), None, settings(num_classes=10))
    generator, discriminator, g_opt, d_opt = _setup()
    with pytest.raises(ValueError, match="critic steps"):
        train_step(generator, discriminator, g_opt, d_opt, torch.zeros(5, 1, 16, 16), None, settings(critic_steps=2))


def test_train_step_reports_d_step_values():
    generator, discriminator, g_opt, d_opt = _setup()
    generator_ref, discriminator_ref = copy.deepcopy(generator), copy.deepcopy(discriminator)
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    out = train_step(generator, discriminator, g_opt, d_opt, real, None, settings(loss="hinge"),
                     torch.Generator().manual_seed(5))

    # Recompute the D-step logits from the pre-step weights and the same latents.
    with torch.no_grad():
        fake = generator_ref(sample_latent(8, 8, "cpu", torch.Generator().manual_seed(5)))
        real_logits, fake_logits = discriminator_ref(real), discriminator_ref(fake)
    assert out["d_real"] == pytest.approx(real_logits.mean().item(), rel=1e-5, abs=1e-6)
    assert out["d_fake"] == pytest.approx(fake_logits.mean().item(), rel=1e-5, abs=1e-6)
    assert out["loss_d"] == pytest.approx(discriminator_loss("hinge", real_logits, fake_logits).item(), rel=1e-5)


def test_discriminator_learns_toy_problem():
    # A fixed striped "real" batch is easy to tell apart from an untrained generator's output.
    generator, discriminator, g_opt, d_opt = _setup(seed=1)
    g_opt.param_groups[0]["lr"] = 0.0  # hold G still so D's loss must fall
    d_opt.param_groups[0]["lr"] = 2e-3
    real = torch.zeros(8, 1, 16, 16)
    real[:, :, ::2] = 1.0
    real[:, :, 1::2] = -1.0
    noise = torch.Generator().manual_seed(0)
    losses = [train_step(generator, discriminator, g_opt, d_opt, real, None, settings(), noise) for _ in range(10)]
    assert all(math.isfinite(v) for step in losses for v in step.values())
    assert losses[-1]["loss_d"] < 0.5 * losses[0]["loss_d"]
    assert losses[-1]["d_real"] > losses[-1]["d_fake"]


def test_train_step_leaves_no_generator_grad_in_d_step():
    # G must not receive gradients from the D update (fakes are detached).
    generator, discriminator, g_opt, d_opt = _setup()
    seen = []
    for p in generator.parameters():
        p.register_hook(lambda g: seen.append(1) or g)
    train_step(generator, discriminator, g_opt, d_opt, torch.zeros(4, 1, 16, 16), None, settings(loss="hinge"))
    # Only the G step's single backward reaches G's parameters.
    assert len(seen) == len(list(generator.parameters()))


@pytest.mark.parametrize("changes", [{}, {"feature_matching": 1.0, "critic_steps": 2}])
def test_generator_update_computes_no_discriminator_weight_gradients(changes):
    """G's backward needs D's input gradients only: D's weight gradients (and their DDP all-reduce) are skipped."""
    generator, discriminator, g_opt, d_opt = _setup()
    seen = []
    for p in discriminator.parameters():
        p.register_hook(lambda g: seen.append(1) or g)
    step = settings(loss="hinge", **changes)
    train_step(generator, discriminator, g_opt, d_opt, torch.zeros(4 * step.critic_steps, 1, 16, 16), None, step)
    assert len(seen) == step.critic_steps * len(list(discriminator.parameters())), "only D's own updates"
    assert all(p.requires_grad for p in discriminator.parameters()), "D's flags are restored after G's update"


@pytest.mark.parametrize("family, changes", [("dcgan", {"loss": "hinge", "feature_matching": 1.0}),
                                             ("wgan_gp", {"loss": "wasserstein", "gradient_penalty": 10.0,
                                                          "critic_steps": 2, "r1_gamma": 1.0})])
def test_train_step_and_ema_under_ddp(tmp_path, family, changes):
    # Single-process gloo group: DDP's reducer with D called several times per update and the
    # penalties' double backward (taken on the unwrapped module).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        generator, discriminator, g_opt, d_opt = _setup(family=family)
        ddp_generator = DistributedDataParallel(generator)
        ddp_discriminator = DistributedDataParallel(discriminator, forward_sync_buffers=False)
        ema = ExponentialMovingAverage(ddp_generator, 0.0)
        step = settings(**changes)
        real = torch.rand(4 * step.critic_steps, 1, 16, 16) * 2 - 1
        for _ in range(2):
            out = train_step(ddp_generator, ddp_discriminator, g_opt, d_opt, real, None, step)
            assert all(math.isfinite(v) for v in out.values())
        ema.update(ddp_generator)
        for ema_p, p in zip(ema.module.parameters(), generator.parameters()):
            torch.testing.assert_close(ema_p, p)
        # DDP's reducers hold the process group: freed after it, gloo's teardown can hang joining its threads.
        del ddp_generator, ddp_discriminator, ema
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_generate_images_is_seeded_batched_and_class_balanced():
    generator, _, _, _ = _setup(num_classes=3)
    generator.eval()
    first = generate_images(generator, 10, 8, seed=3, batch_size=4, num_classes=3)
    assert first.shape == (10, 1, 16, 16)
    assert torch.equal(first, generate_images(generator, 10, 8, seed=3, batch_size=4, num_classes=3)), "same seed"
    assert not torch.equal(first, generate_images(generator, 10, 8, seed=4, batch_size=4, num_classes=3))
    # Classes cycle 0, 1, 2, 0, ... across batch boundaries: sample 4 is the first of batch 2, class 1.
    latents = sample_latent(10, 8, "cpu", torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = generator(latents[4:5], torch.tensor([1]))
    torch.testing.assert_close(first[4:5], expected)


def test_generate_images_asks_for_the_requested_labels():
    """Evaluation scores samples against requested_labels: they must be the labels the generator got."""
    asked = []

    def recording_generator(latents: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        asked.append(labels)
        return latents

    generate_images(recording_generator, 10, 8, seed=0, batch_size=4, num_classes=3)
    assert torch.equal(torch.cat(asked), requested_labels(10, 3))
    assert requested_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert requested_labels(7, 0) is None


def test_mode_seeking_loss_rewards_different_images_for_different_latents():
    latents = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    same = torch.zeros(8, 1, 4, 4)
    spread = torch.cat([torch.zeros(4, 1, 4, 4), torch.ones(4, 1, 4, 4)])
    assert mode_seeking_loss(spread, latents) < 1.0 < mode_seeking_loss(same, latents)
    # exactly 1 / (mean image distance / mean latent distance) per pair, averaged
    ratio = 1.0 / (latents[:4] - latents[4:]).abs().mean(1)
    torch.testing.assert_close(mode_seeking_loss(spread, latents), (1.0 / (ratio + 1e-5)).mean())


def test_mode_seeking_pairs_ask_for_the_same_labels_and_train():
    generator, discriminator = build_gan(ModelSpec("dcgan", 8, 1, 16, 8, num_classes=3))
    seen = []
    original = generator.forward
    generator.forward = lambda z, labels=None: seen.append(labels) or original(z, labels)
    settings = StepSettings(latent_dim=8, loss="non_saturating", num_classes=3, critic_steps=1, gradient_penalty=0.0,
                            r1_gamma=0.0, label_smoothing=0.0, feature_matching=0.0, augment=(), mode_seeking=1.0)
    adam = [torch.optim.Adam(m.parameters(), 1e-3) for m in (generator, discriminator)]
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    out = train_step(generator, discriminator, *adam, real, torch.randint(3, (8,)), settings,
                     torch.Generator().manual_seed(0))
    g_labels = seen[-1]
    assert torch.equal(g_labels[:4], g_labels[4:]) and all(map(math.isfinite, out.values()))
