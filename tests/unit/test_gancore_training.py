"""TrainingState: the one factory of G, D, EMA and optimisers that the worker and the benchmarks share."""

import dataclasses

import torch

from gancore.augment import AdaptiveAugment
from gancore.models import ModelSpec
from gancore.step import StepSettings
from gancore.training import OptimizerSettings, TrainingState

SPEC = ModelSpec(family="dcgan", latent_dim=8, channels=1, image_size=16, base_channels=4, num_classes=3)
SETTINGS = StepSettings(latent_dim=8, loss="non_saturating", num_classes=3, critic_steps=1, gradient_penalty=0.0,
                        r1_gamma=0.0, label_smoothing=0.0, feature_matching=0.0, augment=())
ADAM = OptimizerSettings(lr_g=4e-4, lr_d=2e-4, beta1=0.0, beta2=0.9)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    data = torch.Generator().manual_seed(step)
    images = torch.rand(8, 1, 16, 16, generator=data) * 2 - 1
    return images, torch.randint(3, (8,), generator=data), torch.Generator().manual_seed(1000 + step)


def train(state: TrainingState, steps: range) -> None:
    for step in steps:
        images, labels, noise = batch(step)
        state.iteration(images, labels, SETTINGS, noise)


def test_same_seed_same_initial_weights_and_optimizers_use_their_settings():
    first, second = (TrainingState.create(SPEC, ADAM, 0.99, seed=5) for _ in range(2))
    for a, b in zip(first.generator.parameters(), second.generator.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.generator_optimizer.param_groups[0]["lr"] == 4e-4
    assert first.discriminator_optimizer.param_groups[0]["lr"] == 2e-4
    assert first.discriminator_optimizer.param_groups[0]["betas"] == (0.0, 0.9)


def test_restored_state_continues_bit_for_bit():
    """A checkpoint's state_dict, loaded into a fresh state, trains to the same weights as never stopping."""
    straight = TrainingState.create(SPEC, ADAM, 0.9, seed=0)
    train(straight, range(4))
    interrupted = TrainingState.create(SPEC, ADAM, 0.9, seed=0)
    train(interrupted, range(2))
    restored = TrainingState.create(SPEC, ADAM, 0.9, seed=123)  # other initial weights: all must come from the dict
    restored.load_state_dict(interrupted.state_dict())
    train(restored, range(2, 4))
    for a, b in zip(straight.ema.module.state_dict().values(), restored.ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_iteration_moves_the_ema_toward_the_generator():
    state = TrainingState.create(SPEC, ADAM, 0.5, seed=0)
    before = [p.clone() for p in state.ema.module.parameters()]
    train(state, range(1))
    moved = [not torch.equal(a, b) for a, b in zip(before, state.ema.module.parameters(), strict=True)]
    assert any(moved)
    # decay 0.5: exactly halfway from the old EMA to the new generator weights
    for old, ema, current in zip(before, state.ema.module.parameters(), state.generator.parameters(), strict=True):
        torch.testing.assert_close(ema, 0.5 * old + 0.5 * current)


def test_set_optimizer_changes_rates_of_a_restored_state():
    state = TrainingState.create(SPEC, ADAM, 0.99, seed=0)
    state.set_optimizer(OptimizerSettings(lr_g=1e-3, lr_d=5e-4, beta1=0.5, beta2=0.999))
    assert [g["lr"] for g in state.generator_optimizer.param_groups] == [1e-3]
    assert [g["betas"] for g in state.discriminator_optimizer.param_groups] == [(0.5, 0.999)]


def test_ada_p_is_part_of_the_state_and_a_resume_with_it_is_exact():
    """augment: ada moves p from D's real logits; a restore mid-interval continues bit for bit, p included."""
    settings = dataclasses.replace(SETTINGS, augment=("ada",), ada_adjust_images=64)

    def run(state, steps):
        ps = []
        for step in steps:
            images, labels, noise = batch(step)
            ps.append(state.iteration(images, labels, settings, noise)["augment_p"])
        return ps

    def create(seed):
        state = TrainingState.create(SPEC, ADAM, 0.9, seed=seed)
        state.adaptive_augment = AdaptiveAugment(target=-1.0)  # every r_t is above it: p rises every 4 steps
        return state

    straight = create(0)
    trace = run(straight, range(10))
    assert trace[:4] == [0.0] * 4 and trace[4] == trace[7] == 4 * 8 / 64 and trace[8] == 1.0, trace  # 8 reals a step
    interrupted = create(0)
    run(interrupted, range(5))  # stopped between two moves of p (every 4 steps)
    restored = create(9)
    restored.load_state_dict(interrupted.state_dict())
    assert run(restored, range(5, 10)) == trace[5:]
    for a, b in zip(straight.state_dict()["generator"].values(), restored.state_dict()["generator"].values()):
        assert torch.equal(a, b)
    assert straight.adaptive_augment.state_dict() == restored.adaptive_augment.state_dict()
