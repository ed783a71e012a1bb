"""Stage prepare on transparent images (issue 15): every image with an alpha band, transparent palette entries or a
transparent colour key is composited over data.background before it is resized, so the colours files keep under
fully transparent pixels (here saturated red/green stripes) never reach the prepared images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import data_params, encode, npz, pixels_by_key, write_folder

from pipelines.stages.prepare import prepare
from pipelines.sources import ImageShape

SOURCE_SIDE, SIZE = 96, 32  # resized 3:1; the Lanczos filter then reaches 3 prepared pixels either side
RED, GREEN, TEAL, BLUE = (255, 0, 0), (0, 255, 0), (20, 160, 140), (0, 0, 255)
LEVEL = {"white": 255, "black": 0}
HALF = 128  # alpha of the half-transparent region

# Where each part of the drawing lies, in prepared pixels (x3 in the file): 0 transparent, 1 the opaque subject,
# 2 a half-transparent region beside it. INTERIOR and BORDER are the prepared pixels the filter computes from
# one part alone (3 or more pixels from any edge between parts), hence exact.
PARTS = np.zeros((SIZE, SIZE), np.uint8)
PARTS[10:22, 4:16] = 1
PARTS[10:22, 18:30] = 2
PARTS = PARTS.repeat(3, axis=0).repeat(3, axis=1)
SUBJECT_INTERIOR = (slice(13, 19), slice(7, 13))
HALF_INTERIOR = (slice(13, 19), slice(21, 27))
BORDER_ROWS = np.r_[0:7, 25:SIZE]
STRIPES = np.broadcast_to(np.arange(SOURCE_SIDE) // 2 % 2, (SOURCE_SIDE, SOURCE_SIDE))  # 2-pixel vertical stripes


def rgba_drawing() -> np.ndarray:
    """Red/green stripes under alpha 0 (what icon editors smear out to the border), a teal subject, half-
    transparent blue beside it."""
    pixels = np.where(STRIPES[..., None] == 0, np.array([*RED, 0]), np.array([*GREEN, 0]))
    pixels[PARTS == 1] = (*TEAL, 255)
    pixels[PARTS == 2] = (*BLUE, HALF)
    return pixels.astype(np.uint8)


def palette_drawing() -> Image.Image:
    """The same drawing as a palette PNG: red and green entries fully transparent, blue half (tRNS alpha)."""
    image = Image.fromarray(np.choose(PARTS, [STRIPES, 2, 3]).astype(np.uint8), "P")
    image.putpalette([*RED, *GREEN, *TEAL, *BLUE])
    image.info["transparency"] = bytes([0, 0, 255, HALF])
    return image


def la_drawing() -> Image.Image:
    grey = np.choose(PARTS, [STRIPES * 255, 90, 200])
    alpha = np.choose(PARTS, [0, 255, HALF])
    return Image.fromarray(np.stack([grey, alpha], axis=-1).astype(np.uint8), "LA")


def keyed(mode: str, key: int | tuple[int, ...], subject: int | tuple[int, ...]) -> Image.Image:
    """1, L or RGB with a tRNS colour key: the key colour (everywhere but the subject) is transparent."""
    image = Image.new(mode, (SOURCE_SIDE, SOURCE_SIDE), key)
    image.paste(subject, mask=Image.fromarray((PARTS == 1).astype(np.uint8) * 255))
    image.info["transparency"] = key
    return image


# name: (file, subject colour, colour and alpha of the half-transparent region); a key leaves no half region.
DRAWINGS = {
    "rgba.png": (encode(rgba_drawing()), TEAL, BLUE, HALF),
    "rgba.npz": (npz(images=rgba_drawing()[None]), TEAL, BLUE, HALF),  # (N, H, W, 4) rows are RGBA too
    "palette.png": (encode(palette_drawing()), TEAL, BLUE, HALF),
    "la.png": (encode(la_drawing()), (90,) * 3, (200,) * 3, HALF),
    "rgb_key.png": (encode(keyed("RGB", RED, TEAL)), TEAL, RED, 0),
    "l_key.png": (encode(keyed("L", 37, 90)), (90,) * 3, (37,) * 3, 0),
}
ACCEPTED_KEYS = {"rgba.npz": "rgba.npz#images[0]"}


def blend(colour: tuple[int, ...], alpha: int, background: str) -> tuple[int, ...]:
    """`colour` at `alpha` over the background, as the "over" operator gives it."""
    return tuple(round((c * alpha + LEVEL[background] * (255 - alpha)) / 255) for c in colour)


def reference(subject: tuple[int, ...], half: tuple[int, ...], alpha: int, background: str) -> tuple[str, bytes]:
    """The drawing as it should look, opaque: the background wherever it is transparent, no stripes. Named by its
    colours, as drawings that should look alike give one file (prepare keeps one of identical images)."""
    colours = np.array([(LEVEL[background],) * 3, subject, blend(half, alpha, background)], np.uint8)
    return f"reference_{'_'.join(map(str, colours.ravel()))}.png", encode(colours[PARTS])


def in_mode(colour: tuple[int, ...], channels: int) -> np.ndarray:
    """A colour as prepare gives it in `channels`: grayscale is PIL's luma."""
    return np.asarray(Image.new("RGB", (1, 1), colour).convert("L" if channels == 1 else "RGB")).reshape(channels)


def prepared_pixels(folder: Path, tmp_path: Path, **overrides) -> dict[str, np.ndarray]:
    """Each accepted key's prepared pixels (shards hold images in sha256 order, split by split)."""
    out_dir = tmp_path / "prepared"
    tmp_path.mkdir(exist_ok=True)
    manifest = prepare(data_params(str(folder), image_size=SIZE, **overrides), out_dir, tmp_path / "data.json")
    assert manifest["counts"]["rejected"] == 0
    return pixels_by_key(manifest, out_dir)


@pytest.mark.parametrize("background", ["white", "black"])
@pytest.mark.parametrize("channels", [3, 1])
def test_transparent_pixels_become_the_background_whatever_colour_they_hold(
    background: str, channels: int, tmp_path: Path
) -> None:
    files = {name: content for name, (content, *_) in DRAWINGS.items()}
    references = {name: reference(*colours, background) for name, (_, *colours) in DRAWINGS.items()}
    files |= dict(references.values())
    folder = write_folder(tmp_path / "images", files)

    pixels = prepared_pixels(folder, tmp_path, background=background, channels=channels)

    for name, (_, subject, half, alpha) in DRAWINGS.items():
        image = pixels[ACCEPTED_KEYS.get(name, name)].astype(int)
        assert image.shape == (SIZE, SIZE, channels)
        assert (image[BORDER_ROWS] == LEVEL[background]).all(), f"{name}: transparent border is exactly the background"
        assert (image[SUBJECT_INTERIOR] == in_mode(subject, channels)).all(), f"{name}: subject colour kept"
        expected_half = in_mode(blend(half, alpha, background), channels)
        assert np.abs(image[HALF_INTERIOR] - expected_half).max() <= 2, f"{name}: half-transparent pixels blend"
        # Everywhere, edges included: what the clean drawing prepares to, so no stripe colour bleeds in anywhere.
        clean = pixels[references[name][0]].astype(int)
        assert np.abs(image - clean).max() <= 2, f"{name}: junk colours under transparent pixels leaked"


def test_the_background_changes_only_transparent_pixels(tmp_path: Path) -> None:
    """Opaque images, with or without an alpha band, prepare the same over either background; white is the
    default of params.yaml."""
    opaque = rgba_drawing()
    opaque[..., 3] = 255
    folder = write_folder(tmp_path / "images", {"opaque_rgba.png": encode(opaque), "rgba.png": DRAWINGS["rgba.png"][0],
                                                "opaque_rgb.png": encode(opaque[..., :3])})
    assert ImageShape.of(data_params(str(folder))).background == "white"

    default, black = (prepared_pixels(folder, tmp_path / name, **overrides)
                      for name, overrides in (("default", {}), ("black", {"background": "black"})))

    for pixels in (default, black):
        assert (pixels["opaque_rgba.png"] == pixels["opaque_rgb.png"]).all()
    assert (default["opaque_rgb.png"] == black["opaque_rgb.png"]).all()
    assert (default["rgba.png"][BORDER_ROWS] == 255).all() and (black["rgba.png"][BORDER_ROWS] == 0).all()
