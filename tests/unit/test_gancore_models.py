import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gancore.models import FAMILIES, build_gan
from gancore.models.classifier import Classifier
from gancore.models.dcgan import Discriminator, Generator

SIZES = [16, 32, 64, 128]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes_and_range(image_size, channels):
    generator, discriminator = build_gan("dcgan", 16, channels, image_size, 8)
    images = generator(torch.randn(3, 16))
    assert images.shape == (3, channels, image_size, image_size)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0
    logits = discriminator(images)
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


def test_dcgan_block_count_and_width_cap():
    generator = Generator(16, 3, 128, 4)
    convs = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == 6  # 1x1 -> 4x4, then five doublings to 128
    assert max(c.out_channels for c in convs) == 4 * 8
    assert convs[0].out_channels == 32 and convs[-2].out_channels == 4
    discriminator = Discriminator(3, 16, 4)
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 1]


def test_discriminator_first_layer_has_no_batchnorm():
    layers = list(Discriminator(3, 32, 8).net)
    assert isinstance(layers[0], nn.Conv2d) and isinstance(layers[1], nn.LeakyReLU)
    assert layers[1].negative_slope == 0.2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers) == 2


@pytest.mark.parametrize("image_size", [8, 24, 256, 0])
def test_dcgan_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        Generator(16, 3, image_size, 8)
    with pytest.raises(ValueError, match="image_size"):
        Discriminator(3, image_size, 8)


def test_dcgan_init_statistics():
    generator, discriminator = build_gan("dcgan", 64, 3, 64, 32)
    for model in (generator, discriminator):
        conv_types = (nn.Conv2d, nn.ConvTranspose2d)
        convs = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, conv_types)])
        assert convs.mean().abs() < 0.002
        assert convs.std().item() == pytest.approx(0.02, rel=0.05)
        bn = torch.cat([m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
        assert bn.mean().item() == pytest.approx(1.0, abs=0.005)
        assert bn.std().item() == pytest.approx(0.02, rel=0.25)


def test_build_gan_registry():
    assert FAMILIES == ("dcgan",)
    generator, _ = build_gan("dcgan", 10, 1, 16, 4)
    assert generator.latent_dim == 10
    with pytest.raises(ValueError, match="dcgan"):
        build_gan("stylegan9", 10, 1, 16, 4)


@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_classifier_shapes(image_size, channels):
    model = Classifier(channels, image_size, num_classes=10, feature_dim=32)
    x = torch.rand(5, channels, image_size, image_size) * 2 - 1
    features = model.features(x)
    assert features.shape == (5, 32)
    assert (features >= 0).all()  # taken after the ReLU
    assert model(x).shape == (5, 10)


def test_classifier_is_small_and_batch_independent():
    model = Classifier(3, 32, 10)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    model.train()
    train_out = model(x)
    model.eval()
    torch.testing.assert_close(model(x), train_out)
    torch.testing.assert_close(model(x[:1]), train_out[:1], rtol=1e-4, atol=1e-5)


def test_classifier_learns_toy_task():
    # Bright upper half vs. bright lower half: a CNN must separate these almost at once.
    n = 64
    labels = torch.randint(0, 2, (n,))
    x = torch.full((n, 1, 16, 16), -1.0)
    x[labels == 0, :, :8] = 1.0
    x[labels == 1, :, 8:] = 1.0
    x += 0.3 * torch.randn_like(x)
    model = Classifier(1, 16, num_classes=2, feature_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert (model(x).argmax(1) == labels).float().mean() > 0.95


def test_gancore_imports_no_workflow_packages():
    code = (
        "import sys, pkgutil, importlib, gancore\n"
        "for m in pkgutil.walk_packages(gancore.__path__, 'gancore.'): importlib.import_module(m.name)\n"
        "print(','.join(sorted({'ray', 'mlflow', 'dvc', 'boto3', 'PIL'} & set(sys.modules))))\n"
    )
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
