import numpy as np
import pytest
import torch
from torch import nn

from gancore.ema import ExponentialMovingAverage
from gancore.images import from_uint8, make_grid, to_uint8


def test_uint8_roundtrip_nhwc():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    images = from_uint8(pixels)
    assert images.dtype == torch.float32 and images.shape == (4, 3, 5, 6)
    assert images.min() >= -1 and images.max() <= 1
    np.testing.assert_array_equal(to_uint8(images), pixels)
    np.testing.assert_array_equal(to_uint8(images.numpy()), pixels)


def test_uint8_grayscale_without_channel_axis():
    pixels = np.array([[[0, 255], [128, 1]]], dtype=np.uint8)
    images = from_uint8(pixels)
    assert images.shape == (1, 1, 2, 2)
    assert images[0, 0, 0, 0] == -1 and images[0, 0, 0, 1] == 1
    assert to_uint8(images).shape == (1, 2, 2, 1)


def test_to_uint8_clips_and_maps_endpoints():
    images = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5)
    np.testing.assert_array_equal(to_uint8(images)[0, 0, :, 0], [0, 0, 128, 255, 255])


def test_image_input_validation():
    with pytest.raises(ValueError):
        from_uint8(np.zeros((2, 3, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 4, 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_make_grid_layout(channels):
    images = torch.full((5, channels, 4, 6), 1.0)
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, channels)
    assert (grid[2:6, 2:8] == 255).all()  # first image
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()  # padding
    assert (grid[8:12, 18:24] == 0).all()  # sixth cell is empty
    assert (grid == 255).sum() == 5 * 4 * 6 * channels


def test_make_grid_fewer_images_than_nrow():
    assert make_grid(torch.zeros(2, 3, 4, 4), nrow=8, padding=0).shape == (4, 8, 3)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()
    model(torch.randn(8, 3))  # changes BatchNorm running statistics


def test_ema_is_frozen_eval_copy():
    torch.manual_seed(0)
    model = _model()
    ema = ExponentialMovingAverage(model, 0.9)
    assert ema.module is not model and not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_ema_decay_zero_copies_and_one_keeps():
    torch.manual_seed(0)
    model = _model()
    copier, keeper = ExponentialMovingAverage(model, 0.0), ExponentialMovingAverage(model, 1.0)
    initial = [p.clone() for p in keeper.module.parameters()]
    _perturb(model)
    copier.update(model)
    keeper.update(model)
    for ema_p, p, p0 in zip(copier.module.parameters(), model.parameters(), initial):
        torch.testing.assert_close(ema_p, p)
        assert not torch.equal(p, p0)
    for ema_p, p0 in zip(keeper.module.parameters(), initial):
        torch.testing.assert_close(ema_p, p0)
    # Buffers are copied regardless of decay.
    torch.testing.assert_close(keeper.module[1].running_mean, model[1].running_mean)


def test_ema_lerp_math():
    torch.manual_seed(0)
    model = _model()
    ema = ExponentialMovingAverage(model, 0.75)
    old = [p.clone() for p in model.parameters()]
    _perturb(model)
    ema.update(model)
    for ema_p, p, p0 in zip(ema.module.parameters(), model.parameters(), old):
        torch.testing.assert_close(ema_p, 0.75 * p0 + 0.25 * p)


def test_ema_state_dict_roundtrip():
    torch.manual_seed(0)
    model = _model()
    ema = ExponentialMovingAverage(model, 0.5)
    _perturb(model)
    ema.update(model)
    restored = ExponentialMovingAverage(_model(), 0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.5
    for a, b in zip(restored.module.state_dict().values(), ema.module.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError):
        ExponentialMovingAverage(_model(), 1.5)
