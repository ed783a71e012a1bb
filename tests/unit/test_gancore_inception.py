import numpy as np
import pytest
import torch
from torch import nn

from gancore.metrics import InceptionFeatures, TorchScriptFeatures, encoder_features, load_encoder


class _ChannelMeans(nn.Module):
    """Stand-in with the Inception file's call convention: features are the 3 channel means, tiled to 2048."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features, "the wrapper must ask for pool features"
        assert x.dtype == torch.float32 and x.shape[1] == 3, "the network takes 3-channel float images"
        assert bool(x.min() >= 0.0) and bool(x.max() <= 255.0), "the network takes pixels in [0, 255]"
        return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


class _NoFeaturesFlag(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_ChannelMeans()), str(path))
    return path


def test_maps_minus_one_one_to_0_255_exactly(stand_in):
    network = InceptionFeatures(stand_in)
    values = torch.tensor([-1.0, 0.0, 1.0, 0.5])
    images = values[:, None, None, None].expand(4, 3, 5, 7)
    with torch.no_grad():
        features = network(images)
    assert features.shape == (4, InceptionFeatures.feature_dim)
    assert torch.equal(features[:, 0], torch.tensor([0.0, 127.5, 255.0, 191.25]))


def test_grayscale_is_repeated_to_three_channels(stand_in):
    gray = torch.rand(5, 1, 9, 9) * 2 - 1
    with torch.no_grad():
        features = InceptionFeatures(stand_in)(gray)
    expected = ((gray + 1) * 127.5).mean(dim=(2, 3))
    for channel in range(3):
        torch.testing.assert_close(features[:, channel : channel + 1], expected)


def test_colour_channels_keep_their_order(stand_in):
    images = torch.stack([torch.full((4, 4), v) for v in (-1.0, 0.0, 1.0)])[None]
    with torch.no_grad():
        features = InceptionFeatures(stand_in)(images)
    assert features[0, :6].tolist() == [0.0, 127.5, 255.0, 0.0, 127.5, 255.0]


def test_out_of_range_pixels_are_clipped(stand_in):
    images = torch.tensor([-3.0, 1.5, 0.0])[None, :, None, None].expand(1, 3, 2, 2)
    with torch.no_grad():
        features = InceptionFeatures(stand_in)(images)
    assert features[0, :3].tolist() == [0.0, 255.0, 127.5]


def test_batched_extraction_matches_one_batch(stand_in):
    images = torch.rand(10, 3, 8, 8) * 2 - 1
    whole = encoder_features(stand_in, images, batch_size=64)
    batched = encoder_features(str(stand_in), images, batch_size=3)
    assert whole.dtype == np.float64 and whole.shape == (10, 2048)
    np.testing.assert_array_equal(batched, whole)
    np.testing.assert_allclose(whole[:, :3], ((images.double() + 1) * 127.5).mean(dim=(2, 3)).numpy(), rtol=1e-6)


def test_rejects_wrong_image_shapes(stand_in):
    network = InceptionFeatures(stand_in)
    with pytest.raises(ValueError, match="1 or 3"):
        network(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="1 or 3"):
        network(torch.zeros(3, 8, 8))


def test_missing_file_names_path_and_expected_file(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt") as error:
        InceptionFeatures(missing)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("kind", ["text", "state_dict"])
def test_non_torchscript_file_names_path(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("not a network")
    else:
        torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a TorchScript file.*inception-2015-12-05.pt") as error:
        InceptionFeatures(path)
    assert str(path) in str(error.value)


def test_torchscript_without_return_features_is_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(_NoFeaturesFlag()), str(path))
    with pytest.raises(ValueError, match="return_features") as error:
        InceptionFeatures(path)
    assert str(path) in str(error.value)


class _MeanAndSpread(torch.nn.Module):
    """A stand-in for DINOv2 or CLIP exported with torch.jit: (N, 3, H, W) -> (N, 6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_any_torchscript_encoder_is_a_feature_space_and_inception_is_recognised(tmp_path, stand_in):
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(_MeanAndSpread()), str(path))
    assert isinstance(load_encoder(path), TorchScriptFeatures)
    assert isinstance(load_encoder(stand_in), InceptionFeatures), "the StyleGAN/clean-fid file keeps its preprocessing"
    grey = torch.linspace(-2, 2, 2 * 16).reshape(2, 1, 4, 4)
    features = encoder_features(path, grey, batch_size=1)
    assert features.shape == (2, 6) and features.dtype == np.float64
    clamped = grey.clamp(-1, 1)
    assert np.allclose(features[:, 0], clamped.mean(dim=(1, 2, 3)).numpy()), "grey repeated to RGB, clamped to [-1, 1]"


def test_an_encoder_that_does_not_return_features_is_named(tmp_path):
    path = tmp_path / "images.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))  # returns the images, not (N, D)
    with pytest.raises(ValueError, match=r"returned shape \(2, 3, 4, 4\)"):
        encoder_features(path, torch.zeros(2, 3, 4, 4))
