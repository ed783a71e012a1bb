import itertools

import pytest
import torch
import torch.nn.functional as F

from gancore.augment import POLICIES, AdaptiveAugment, diff_augment


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, channels: int, size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=_seeded(seed), dtype=dtype) * 2.0 - 1.0


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = image[..., i + dy, j + dx], zero outside the image."""
    size = image.shape[-1]
    padded = F.pad(image, [size, size, size, size])
    return padded[..., size + dy : 2 * size + dy, size + dx : 2 * size + dx]


@pytest.mark.parametrize("policy", [(), []])
def test_empty_policy_is_identity(policy):
    images = _images(4, 3, 8)
    assert diff_augment(images, policy, _seeded()) is images


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_preserved(channels, dtype):
    images = _images(5, channels, 16, dtype=dtype)
    out = diff_augment(images, POLICIES, _seeded())
    assert out.shape == images.shape and out.dtype == dtype
    assert not torch.equal(out, images)


@pytest.mark.parametrize("policy", POLICIES)
def test_gradients_flow_and_are_correct(policy):
    images = _images(3, 3, 8).requires_grad_()
    weights = torch.rand(3, 3, 8, 8, generator=_seeded(1))
    (diff_augment(images, (policy,), _seeded()) * weights).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    small = _images(1, 3, 8, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: diff_augment(x, (policy,), _seeded()), (small,))


def test_same_seed_same_augmentation_different_seed_different():
    images = _images(8, 3, 16)
    first = diff_augment(images, POLICIES, _seeded(3))
    assert torch.equal(first, diff_augment(images, POLICIES, _seeded(3)))
    assert not torch.equal(first, diff_augment(images, POLICIES, _seeded(4)))


def test_translation_is_a_zero_padded_shift_within_an_eighth():
    size, max_shift = 16, 2
    images = _images(200, 3, size) + 3.0  # no zeros in the input, so any zero in the output is padding
    out = diff_augment(images, ("translation",), _seeded())
    offsets = list(itertools.product(range(-2 * max_shift, 2 * max_shift + 1), repeat=2))
    used = set()
    for image, augmented in zip(images, out):
        matches = [(dy, dx) for dy, dx in offsets if torch.equal(augmented, _shifted(image, dy, dx))]
        assert len(matches) == 1
        used.add(matches[0])
    # Every shift of up to size/8 pixels in each direction occurs, and no larger one.
    assert used == set(itertools.product(range(-max_shift, max_shift + 1), repeat=2))


def test_translation_moves_a_single_pixel_by_at_most_an_eighth():
    size = 32
    images = torch.zeros(64, 1, size, size)
    images[:, :, 16, 16] = 1.0
    out = diff_augment(images, ("translation",), _seeded())
    for augmented in out[:, 0]:
        rows, cols = torch.nonzero(augmented, as_tuple=True)
        assert len(rows) == 1 and augmented[rows, cols].item() == 1.0
        assert abs(rows.item() - 16) <= size // 8 and abs(cols.item() - 16) <= size // 8


def test_cutout_zeroes_one_half_size_square_clipped_at_the_border():
    size, square = 16, 8
    images = torch.rand(200, 3, size, size, generator=_seeded()) + 0.1
    out = diff_augment(images, ("cutout",), _seeded())
    full, clipped_sides = 0, set()
    for image, augmented in zip(images, out):
        zero = augmented == 0
        assert torch.equal(zero, zero[:1].expand_as(zero))  # same square in every channel
        rows, cols = torch.nonzero(zero[0], as_tuple=True)
        top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
        assert zero[0, top : bottom + 1, left : right + 1].all()  # the zeros form one rectangle ...
        assert zero[0].sum() == (bottom - top + 1) * (right - left + 1)
        height, width = bottom - top + 1, right - left + 1
        # ... which is the full square unless it is cut by the image border.
        assert height == square or (height < square and (top == 0 or bottom == size - 1))
        assert width == square or (width < square and (left == 0 or right == size - 1))
        assert torch.equal(augmented[~zero], image[~zero])
        full += height == width == square
        clipped_sides |= {side for side, cut in [("top", top == 0), ("bottom", bottom == size - 1),
                                                 ("left", left == 0), ("right", right == size - 1)] if cut}
    # Square positions cover the whole image: some squares are whole, some cut at each border.
    assert full > 0 and clipped_sides == {"top", "bottom", "left", "right"}


def test_color_on_constant_image_only_shifts_brightness():
    # Saturation and contrast scale deviations from a mean, which a constant image does not have.
    images = torch.full((50, 3, 8, 8), 0.3)
    out = diff_augment(images, ("color",), _seeded())
    shift = out - images
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)
    assert (shift.abs() <= 0.5 + 1e-6).all() and shift.std() > 0.1


@pytest.mark.parametrize("channels", [1, 3])
def test_color_matches_reference_formula(channels):
    # Brightness, then saturation around the per-pixel channel mean (the identity for one channel),
    # then contrast around the per-image mean, with one draw each per image.
    images = _images(6, channels, 8)
    out = diff_augment(images, ("color",), _seeded(5))
    draws = _seeded(5)
    brightness = torch.rand(6, 1, 1, 1, generator=draws) - 0.5
    saturation = torch.rand(6, 1, 1, 1, generator=draws) * 2.0
    contrast = torch.rand(6, 1, 1, 1, generator=draws) + 0.5
    expected = images + brightness
    if channels == 3:
        expected = (expected - expected.mean(1, keepdim=True)) * saturation + expected.mean(1, keepdim=True)
    expected = (expected - expected.mean((1, 2, 3), keepdim=True)) * contrast + expected.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, images)


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError, match="color, translation, cutout"):
        diff_augment(_images(2, 3, 8), ("color", "rotate"), _seeded())
    with pytest.raises(TypeError, match="sequence of names"):
        diff_augment(_images(2, 3, 8), "color", _seeded())


def test_ada_at_p_zero_is_identity_and_at_p_one_augments_every_image():
    images = _images(64, 3, 16)
    assert diff_augment(images, ("ada",), _seeded(), probability=0.0) is images
    out = diff_augment(images, ("ada",), _seeded(), probability=1.0)
    changed = (out - images).flatten(1).abs().amax(1) > 0
    assert changed.all(), "every image goes through color (always a change) at p = 1"


def test_ada_augments_about_p_of_the_images_per_op():
    images = _images(2000, 3, 8)
    # color alone would change an image whenever drawn; count images left exactly as they were
    out = diff_augment(images, ("ada",), _seeded(), probability=0.3)
    untouched = ((out - images).flatten(1).abs().amax(1) == 0).float().mean().item()
    # untouched needs no op drawn, bar ops that happen to be no-ops (zero shift, unflipped): >= 0.7^4 = 0.24
    assert 0.24 <= untouched <= 0.45


def test_ada_stands_alone():
    with pytest.raises(ValueError, match="alone"):
        diff_augment(_images(2, 3, 8), ("ada", "color"), _seeded())


def test_flip_mirrors_about_half_the_images_and_nothing_else():
    images = _images(400, 1, 8)
    out = diff_augment(images, ("flip",), _seeded())
    mirrored = torch.tensor([torch.equal(a, b.flip(2)) for a, b in zip(out, images)])
    kept = torch.tensor([torch.equal(a, b) for a, b in zip(out, images)])
    assert (mirrored | kept).all() and 0.4 < mirrored.float().mean() < 0.6


def test_ada_p_rises_while_d_is_sure_of_the_reals_and_falls_when_it_is_not():
    controller = AdaptiveAugment()
    for _ in range(8):  # two moves of p: 64 images a step, 4 steps a move, 1,024 images for the full range
        controller.observe(0.9, 64, adjust_images=1024, device=torch.device("cpu"))
    assert controller.probability == pytest.approx(0.5)
    for _ in range(4):
        controller.observe(0.2, 64, adjust_images=1024, device=torch.device("cpu"))
    assert controller.probability == pytest.approx(0.25)
    for _ in range(40):
        controller.observe(-1.0, 64, adjust_images=1024, device=torch.device("cpu"))
    assert controller.probability == 0.0, "p stays in [0, 1]"
    restored = AdaptiveAugment()
    controller.observe(1.0, 64, adjust_images=1024, device=torch.device("cpu"))  # mid-interval state
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
