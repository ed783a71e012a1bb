"""The embedded RGB dataset: built from photographs installed packages ship, the same bytes on every machine."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
from PIL import Image

import pytest

from pipelines.sample_data import EMOJI_PIXELS, PATCH_PIXELS, PHOTOS, SAMPLE_DATASETS, photo_patch_objects


def test_photo_patches_are_balanced_rgb_crops_and_a_prefix_of_the_full_set():
    size, _ = SAMPLE_DATASETS["photo-patches"]
    assert size == 5000 and len(PHOTOS) == 10
    first = list(photo_patch_objects(30))
    again = list(photo_patch_objects(40))[:30]
    assert first == again, "a smaller sample is the start of a larger one, byte for byte"
    names = Counter(key.rsplit("-", 1)[0] for key, _ in first)
    assert len(names) == 10 and set(names.values()) == {3}, f"every photo in turn: {names}"
    assert all("/" not in key for key, _ in first), "one flat folder: unlabelled"
    images = [Image.open(io.BytesIO(body)) for _, body in first]
    assert {(image.mode, image.size) for image in images} == {("RGB", (PATCH_PIXELS, PATCH_PIXELS))}
    pixels = np.stack([np.asarray(image, dtype=np.float64) for image in images])
    assert len({body for _, body in first}) == 30, "no two crops are the same"
    colourful = np.abs(pixels - pixels.mean(axis=3, keepdims=True)).mean(axis=(1, 2, 3))
    assert (colourful > 3).mean() > 0.5, "most crops hold colour, not grey"


@pytest.mark.parametrize("dataset", ["twemoji", "openmoji"])
def test_emoji_sets_are_thousands_of_transparent_objects_shuffled_over_categories(dataset):
    size, build = SAMPLE_DATASETS[dataset]
    assert size > 3000, "a few thousand objects"
    first = list(build(40))
    assert first == list(build(60))[:40], "a smaller sample is the start of a larger one, byte for byte"
    assert all("/" not in key and key.endswith(".png") for key, _ in first), "one flat folder: unlabelled"
    images = [Image.open(io.BytesIO(body)).convert("RGBA") for _, body in first]
    assert {image.size for image in images} == {(EMOJI_PIXELS, EMOJI_PIXELS)}
    alpha = np.stack([np.asarray(image)[..., 3] for image in images])
    assert (alpha[:, 0, 0] == 0).mean() > 0.8, "objects on a transparent background (prepare composites it)"
    assert (alpha > 0).mean(axis=(1, 2)).min() > 0.05, "every image draws something"
    first_code_points = {key.split("-")[0].split(".")[0][:3].lower() for key, _ in first}
    assert len(first_code_points) > 3, "the shuffle mixes the code-point ranges (categories) from the start"
