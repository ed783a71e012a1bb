"""Inception-v3 pool features from the TorchScript file of StyleGAN2-ADA / StyleGAN3 and clean-fid, if a user has it."""

from pathlib import Path

import numpy as np
import torch
from torch import nn

_EXPECTED_FILE = (
    'the TorchScript Inception-v3 "inception-2015-12-05.pt" that StyleGAN2-ADA, StyleGAN3 and clean-fid download '
    "(https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt)"
)


class InceptionFeatures(nn.Module):
    """(N, 2048) pool features of (N, 1 or 3, H, W) images in [-1, 1]; the network resizes to 299x299 itself."""

    feature_dim = 2048

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Inception network at {path}: expected {_EXPECTED_FILE}")
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as error:
            raise ValueError(f"{path} is not a TorchScript file: expected {_EXPECTED_FILE}") from error
        if "return_features" not in [argument.name for argument in network.forward.schema.arguments]:
            raise ValueError(f"{path} is TorchScript without a return_features argument: expected {_EXPECTED_FILE}")
        self.network = network.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        # The network takes float pixels in [0, 255]; out-of-range values are clipped as in `gancore.images.to_uint8`.
        pixels = (images.float().clamp(-1.0, 1.0) + 1.0) * 127.5
        return self.network(pixels.expand(-1, 3, -1, -1), return_features=True)


@torch.no_grad()
def inception_features(
    path: str | Path, images: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """float64 (N, 2048) features of images (N, C, H, W) in [-1, 1]: the features half of `extract`'s output."""
    network = InceptionFeatures(path).to(device)
    features = [network(batch.to(device)).double().cpu() for batch in images.split(batch_size)]
    return torch.cat(features).numpy()
