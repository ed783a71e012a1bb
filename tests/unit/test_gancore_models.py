import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from gancore.models import FAMILIES, ModelSpec, build_gan, dcgan, mlp, sngan
from gancore.models.classifier import Classifier
from gancore.models.layers import (UPSAMPLING, ConditionalBatchNorm2d, Discriminator, MinibatchDiscrimination,
                                   upsampling_conv)

SIZES = [16, 32, 64, 128]
LATENT = 16
CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny: extra intra-op threads only contend with other processes for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spec(family: str, image_size: int = 16, channels: int = 3, num_classes: int = 0, **kwargs) -> ModelSpec:
    base_channels = kwargs.pop("base_channels", 8 if image_size <= 32 else 4)
    return ModelSpec(family, LATENT, channels, image_size, base_channels, num_classes, **kwargs)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def spectral_normed(model: nn.Module) -> list[bool]:
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
    return [parametrize.is_parametrized(m, "weight") for m in layers]


@pytest.mark.parametrize("upsample", UPSAMPLING)
@pytest.mark.parametrize("num_classes", [0, CLASSES])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_range_and_gradients_reach_generator(family, image_size, channels, num_classes, upsample):
    if family == "mlp" and upsample != UPSAMPLING[0]:
        pytest.skip("mlp has no upsampling convolutions")
    generator, discriminator = build_gan(spec(family, image_size, channels, num_classes, upsample=upsample))
    assert (generator.latent_dim, generator.channels, generator.image_size, generator.num_classes) == (
        LATENT, channels, image_size, num_classes)
    labels = torch.randint(0, CLASSES, (3,)) if num_classes else None
    images = generator(torch.randn(3, LATENT), labels)
    assert images.shape == (3, channels, image_size, image_size)
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0
    features = discriminator.features(images)
    assert features.shape == (3, discriminator.feature_dim)
    logits = discriminator(images, labels)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    logits.sum().backward()
    for name, parameter in generator.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_families_and_registry():
    assert FAMILIES == ("mlp", "dcgan", "wgan_gp", "sngan")
    with pytest.raises(ValueError, match="stylegan9"):
        build_gan(spec("stylegan9"))


@pytest.mark.parametrize("image_size", [8, 24, 256, 0])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        spec("dcgan", image_size)
    for family_module in (mlp, dcgan, sngan):
        with pytest.raises(ValueError, match="image_size"):
            family_module.Generator(LATENT, 3, image_size, 8)


@pytest.mark.parametrize("field", ["latent_dim", "channels", "base_channels", "num_classes"])
def test_spec_rejects_impossible_sizes(field):
    with pytest.raises(ValueError, match=field):
        ModelSpec(**{**spec("dcgan").__dict__, field: -1})


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_condition_both_networks(family):
    generator, discriminator = build_gan(spec(family, num_classes=CLASSES))
    generator.eval()
    discriminator.eval()
    with torch.no_grad():  # SNGAN starts with every class's gain 1 and bias 0; training makes them differ
        for module in generator.modules():
            if isinstance(module, ConditionalBatchNorm2d):
                module.gain.weight.normal_(1.0, 0.1)
    z = torch.randn(4, LATENT)
    labels_a, labels_b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    images = generator(z, labels_a)
    assert not torch.allclose(images, generator(z, labels_b))
    torch.testing.assert_close(generator(z, labels_a), images)
    assert not torch.allclose(discriminator(images, labels_a), discriminator(images, labels_b))
    with pytest.raises(ValueError, match="needs labels"):
        generator(z)
    with pytest.raises(ValueError, match="needs labels"):
        discriminator(images)
    with pytest.raises(ValueError, match="LongTensor of shape"):
        discriminator(images, labels_a[:2])


@pytest.mark.parametrize("family", FAMILIES)
def test_unconditional_models_ignore_labels(family):
    generator, discriminator = build_gan(spec(family))
    generator.eval()
    discriminator.eval()
    z, labels = torch.randn(2, LATENT), torch.tensor([0, 1])
    images = generator(z)
    torch.testing.assert_close(generator(z, labels), images)
    torch.testing.assert_close(discriminator(images, labels), discriminator(images))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_can_return_features_of_the_same_pass(family):
    _, discriminator = build_gan(spec(family, num_classes=CLASSES))
    discriminator.eval()  # training mode: dropout and spectral norm's power iteration change every pass
    x, labels = torch.rand(3, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2])
    logits, features = discriminator(x, labels, return_features=True)
    torch.testing.assert_close(logits, discriminator(x, labels))
    torch.testing.assert_close(features, discriminator.features(x))


def test_projection_logit_hand_computed():
    discriminator = Discriminator(nn.Flatten(), feature_dim=2, num_classes=2)
    with torch.no_grad():
        discriminator.linear.weight.copy_(torch.tensor([[1.0, 2.0]]))
        discriminator.linear.bias.fill_(0.5)
        discriminator.embed.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    # linear part 3 + 8 + 0.5 = 11.5; projection <(1, 0), h> = 3 and <(0, -1), h> = -4
    torch.testing.assert_close(discriminator(x, torch.tensor([0, 1])), torch.tensor([14.5, 7.5]))


@pytest.mark.parametrize("family", FAMILIES)
def test_label_changes_logit_by_embedding_difference(family):
    _, discriminator = build_gan(spec(family, num_classes=CLASSES, minibatch_discrimination=True))
    discriminator.eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    labels_a, labels_b = torch.tensor([0, 1, 2]), torch.tensor([3, 3, 4])
    difference = discriminator(x, labels_a) - discriminator(x, labels_b)
    embed = discriminator.embed.weight
    expected = ((embed[labels_a] - embed[labels_b]) * discriminator.features(x)).sum(1)
    torch.testing.assert_close(difference, expected, rtol=1e-4, atol=1e-5)


def test_conditional_generators_use_per_class_batchnorm():
    for family_module in (dcgan, sngan):
        plain = family_module.Generator(LATENT, 3, 32, 8)
        conditional = family_module.Generator(LATENT, 3, 32, 8, num_classes=CLASSES)
        num_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        cbns = [m for m in conditional.modules() if isinstance(m, ConditionalBatchNorm2d)]
        assert num_bn > 0 and len(cbns) == num_bn
        assert all(m.gain.num_embeddings == CLASSES for m in cbns)


def test_wgan_gp_critic_has_no_batchnorm():
    generator, critic = build_gan(spec("wgan_gp", 32))
    assert not any(isinstance(m, _BatchNorm) for m in critic.modules())
    layer_norms = [m for m in critic.modules() if isinstance(m, nn.GroupNorm)]
    assert len(layer_norms) == 2 and all(m.num_groups == 1 for m in layer_norms)
    assert any(isinstance(m, nn.BatchNorm2d) for m in generator.modules())  # the DCGAN generator keeps it
    # Without batch statistics, each sample's score is independent of the rest of the batch even in training.
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(critic(x)[:1], critic(x[:1]), rtol=1e-4, atol=1e-5)


def test_sngan_discriminator_is_spectrally_normalised():
    generator, discriminator = build_gan(spec("sngan", 32, num_classes=CLASSES, minibatch_discrimination=True))
    normed = spectral_normed(discriminator)
    assert len(normed) > 10 and all(normed)
    assert not any(spectral_normed(generator))
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    for _ in range(20):  # each training-mode forward runs one power iteration
        discriminator(x, torch.zeros(8, dtype=torch.long))
    for module in discriminator.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
            sigma = torch.linalg.matrix_norm(module.weight.detach().flatten(1), ord=2)
            assert sigma.item() == pytest.approx(1.0, abs=0.02)


def test_spectral_norm_option():
    _, plain = build_gan(spec("dcgan", num_classes=CLASSES))
    _, normed = build_gan(spec("dcgan", num_classes=CLASSES, spectral_norm=True))
    assert not any(spectral_normed(plain))
    assert all(spectral_normed(normed)) and len(spectral_normed(normed)) == 4  # 2 convs, linear, embedding
    _, sngan_d = build_gan(spec("sngan", spectral_norm=True))  # already normalised: not parametrised twice
    assert all(len(m.parametrizations.weight) == 1 for m in sngan_d.modules() if hasattr(m, "parametrizations"))


def test_minibatch_discrimination_known_answers():
    layer = MinibatchDiscrimination(6, num_kernels=4, kernel_dim=3)
    h = torch.randn(1, 6).repeat(5, 1)
    out = layer(h)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out[:, :6], h)
    torch.testing.assert_close(out[:, 6:], torch.full((5, 4), 4.0))  # exp(0) for each of the 4 others
    far_apart = torch.eye(5, 6) * 1e4
    assert layer(far_apart)[:, 6:].max() < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_minibatch_discrimination_makes_logits_batch_dependent(family):
    _, with_mbd = build_gan(spec(family, minibatch_discrimination=True))
    _, without = build_gan(spec(family))
    assert with_mbd.features(torch.zeros(2, 3, 16, 16)).shape == (2, with_mbd.feature_dim)
    assert with_mbd.linear.in_features == with_mbd.feature_dim + with_mbd.minibatch.num_kernels
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    copies = x[:1].repeat(4, 1, 1, 1)
    for discriminator in (with_mbd, without):
        discriminator.eval()
    assert not torch.allclose(with_mbd(x)[0], with_mbd(copies)[0])
    torch.testing.assert_close(without(x)[0], without(copies)[0])


def test_dcgan_block_count_and_width_cap():
    generator = dcgan.Generator(LATENT, 3, 128, 4)
    convs = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == 6  # 1x1 -> 4x4, then five doublings to 128
    assert max(c.out_channels for c in convs) == 4 * 8
    assert convs[0].out_channels == 32 and convs[-2].out_channels == 4
    _, discriminator = build_gan(spec("dcgan", 16, base_channels=4))
    convs = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert discriminator.feature_dim == discriminator.linear.in_features == 8 * 4 * 4  # 4x4 trunk output


def test_dcgan_discriminator_first_layer_has_no_batchnorm():
    trunk = build_gan(spec("dcgan", 32))[1].trunk
    assert isinstance(trunk[0], nn.Conv2d) and isinstance(trunk[1], nn.LeakyReLU)
    assert trunk[1].negative_slope == 0.2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trunk) == 2


def test_sngan_structure():
    generator, discriminator = build_gan(spec("sngan", 32, base_channels=8))
    assert [b.shortcut[1].out_channels for b in generator.blocks] == [32, 16, 8]  # from 64 wide at 4x4
    blocks = [m for m in discriminator.trunk if isinstance(m, sngan.DownBlock)]
    assert len(blocks) == 4  # 32 -> 16 -> 8 -> 4, then one block at 4x4
    assert not isinstance(blocks[0].residual[0], nn.ReLU)  # the optimized first block sees the raw image
    assert all(isinstance(b.residual[0], nn.ReLU) for b in blocks[1:])
    assert discriminator.feature_dim == 64
    # Global sum (not mean) pooling after the final ReLU: tiling the maps 2x2 quadruples the features.
    head = nn.Sequential(*list(discriminator.trunk)[-2:])
    h = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(head(h.repeat(1, 1, 2, 2)), 4 * head(h))
    torch.testing.assert_close(head(h), h.relu().sum((2, 3)))


def test_mlp_widths_stay_small_for_large_images():
    assert mlp.hidden_widths(1, 32, 64) == [512, 1024]
    generator, discriminator = build_gan(spec("mlp", 128, 3, base_channels=64))
    assert num_params(generator) < 5_000_000 and num_params(discriminator) < 5_000_000
    assert any(isinstance(m, nn.Dropout) for m in discriminator.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_grows_with_base_channels(family):
    narrow = build_gan(spec(family, 32, 1, base_channels=4))
    wide = build_gan(spec(family, 32, 1, base_channels=8))
    for small, large in zip(narrow, wide):
        assert num_params(small) < num_params(large)


def test_dcgan_init_statistics():
    generator, discriminator = build_gan(spec("dcgan", 64, base_channels=32))
    conditional_generator = dcgan.Generator(LATENT, 3, 64, 32, num_classes=CLASSES)
    for model in (generator, discriminator):
        weights = torch.cat([m.weight.flatten() for m in model.modules()
                             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))])
        assert weights.mean().abs() < 0.002
        assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    for gains in (
        torch.cat([m.weight for m in generator.modules() if isinstance(m, _BatchNorm)]),
        torch.cat([m.weight for m in discriminator.modules() if isinstance(m, _BatchNorm)]),
        torch.cat([m.gain.weight.flatten() for m in conditional_generator.modules()
                   if isinstance(m, ConditionalBatchNorm2d)]),
    ):
        assert gains.mean().item() == pytest.approx(1.0, abs=0.005)
        assert gains.std().item() == pytest.approx(0.02, rel=0.25)


@pytest.mark.parametrize("image_size", [28, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_classifier_shapes(image_size, channels):
    model = Classifier(channels, image_size, num_classes=10, feature_dim=32)
    x = torch.rand(5, channels, image_size, image_size) * 2 - 1
    features = model.features(x)
    assert features.shape == (5, 32)
    assert (features >= 0).all()  # taken after the ReLU
    assert model(x).shape == (5, 10)


def test_classifier_past_32_px_costs_about_what_it_does_at_32_and_sees_every_pixel():
    def flops(image_size: int) -> int:
        with FlopCounterMode(display=False) as counter:
            Classifier(3, image_size, 10).features(torch.zeros(1, 3, image_size, image_size))
        return counter.get_total_flops()

    assert flops(64) < 1.5 * flops(32) and flops(128) < 4 * flops(32), "the stem keeps the featurenet stage short"
    image = torch.rand(2, 3, 64, 64, requires_grad=True)
    Classifier(3, 64, 10).features(image).sum().backward()
    assert (image.grad.abs().sum(dim=(0, 1)) > 0).all(), "a stride must not skip pixels (artefacts live there)"


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
    torch.manual_seed(0)
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


@pytest.mark.parametrize("upsample", UPSAMPLING)
def test_only_resize_convolution_keeps_a_flat_input_flat(upsample):
    """The checkerboard of Odena et al. 2016: a stride-2 transposed conv gives each of the four output phases
    its own sub-kernel, so a constant feature map comes out as a 2x2-periodic pattern for almost any weights.
    Resize-convolution applies one kernel everywhere: away from the border a flat input stays flat."""
    torch.manual_seed(3)
    layer = upsampling_conv(4, 2, upsample)
    out = layer(torch.ones(1, 4, 8, 8))[..., 2:-2, 2:-2]  # the border sees zero padding either way
    spread = (out - out.mean(dim=(2, 3), keepdim=True)).abs().max().item()
    if upsample == "resize":
        assert spread < 1e-5
    else:
        assert spread > 1e-2, "a transposed conv's phases differ"


@pytest.mark.parametrize("family", ["dcgan", "sngan", "wgan_gp"])
def test_upsample_choice_changes_only_the_generators_upsampling_layers(family):
    transposed, _ = build_gan(spec(family, 32, upsample="transposed"))
    resized, _ = build_gan(spec(family, 32, upsample="resize"))
    def strided_transposed(g):  # dcgan's first 1x1 -> 4x4 layer is a transposed conv either way (stride 1)
        return [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2)]

    assert strided_transposed(transposed) and not any(isinstance(m, nn.Upsample) for m in transposed.modules()
                                                      if family != "sngan")
    assert not strided_transposed(resized) and any(isinstance(m, nn.Upsample) for m in resized.modules())
    assert transposed(torch.randn(2, LATENT)).shape == resized(torch.randn(2, LATENT)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="upsample"):
        spec(family, 32, upsample="bilinear")
