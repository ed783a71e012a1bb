"""Conversions between model images (float, [-1, 1], NCHW) and uint8 pixels (NHWC)."""

import numpy as np
import torch


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8; out-of-range values are clipped."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {images.shape}")
    pixels = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return pixels.transpose(0, 2, 3, 1)


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) or (N, H, W) uint8 -> float32 tensor (N, C, H, W) in [-1, 1]."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"expected pixels of shape (N, H, W, C) or (N, H, W), got {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))
    return tensor.float() / 127.5 - 1.0


def make_grid(images: torch.Tensor | np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1], `nrow` per row, into one (H', W', C) uint8 image on black."""
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    pixels = to_uint8(images)
    n, height, width, channels = pixels.shape
    rows = -(-n // nrow)
    cols = min(nrow, n)
    grid = np.zeros(
        (rows * (height + padding) + padding, cols * (width + padding) + padding, channels), dtype=np.uint8
    )
    for index, image in enumerate(pixels):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid
