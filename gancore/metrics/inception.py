"""Features from user-supplied TorchScript encoders: the Inception-v3 file of StyleGAN2-ADA / StyleGAN3 and
clean-fid, or any encoder exported to TorchScript (DINOv2, SwAV, CLIP)."""

from pathlib import Path

import numpy as np
import torch
from torch import nn

_EXPECTED_FILE = (
    'the TorchScript Inception-v3 "inception-2015-12-05.pt" that StyleGAN2-ADA, StyleGAN3 and clean-fid download '
    "(https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt)"
)


def _load_torchscript(path: Path, what: str, expected: str) -> torch.jit.ScriptModule:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}: {expected}")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise ValueError(f"{path} is not a TorchScript file: {expected}") from error


class InceptionFeatures(nn.Module):
    """(N, 2048) pool features of (N, 1 or 3, H, W) images in [-1, 1]; the network resizes to 299x299 itself."""

    feature_dim = 2048

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        network = _load_torchscript(Path(path), "Inception network", f"expected {_EXPECTED_FILE}")
        if "return_features" not in [argument.name for argument in network.forward.schema.arguments]:
            raise ValueError(f"{path} is TorchScript without a return_features argument: expected {_EXPECTED_FILE}")
        self.network = network.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        # The network takes float pixels in [0, 255]; out-of-range values are clipped as in `gancore.images.to_uint8`.
        pixels = (images.float().clamp(-1.0, 1.0) + 1.0) * 127.5
        return self.network(pixels.expand(-1, 3, -1, -1), return_features=True)


class TorchScriptFeatures(nn.Module):
    """(N, D) features from any TorchScript encoder that maps (N, 3, H, W) float images in [-1, 1] to (N, D):
    DINOv2, SwAV, CLIP's image tower or a domain model, exported with torch.jit. Resizing and normalising to
    what the encoder was trained on is the exported module's job; grey images are repeated to 3 channels."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.network = _load_torchscript(Path(path), "TorchScript encoder", "export the encoder with torch.jit").eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network(images.float().clamp(-1.0, 1.0).expand(-1, 3, -1, -1))
        if features.ndim != 2 or len(features) != len(images):
            raise ValueError(f"the encoder returned shape {tuple(features.shape)}; a feature space needs (N, D)")
        return features


def load_encoder(path: str | Path) -> nn.Module:
    """The Inception-v3 file of StyleGAN/clean-fid (recognised by its return_features argument) as
    InceptionFeatures, any other TorchScript encoder as TorchScriptFeatures."""
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError):
        return TorchScriptFeatures(path)  # raises the message for a missing or broken file
    is_inception = "return_features" in [argument.name for argument in network.forward.schema.arguments]
    return InceptionFeatures(path) if is_inception else TorchScriptFeatures(path)


@torch.no_grad()
def encoder_features(
    path: str | Path, images: torch.Tensor, batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """float64 (N, D) features of images (N, C, H, W) in [-1, 1] in the space of the encoder at `path`."""
    network = load_encoder(path).to(device)
    features = [network(batch.to(device)).double().cpu() for batch in images.split(batch_size)]
    return torch.cat(features).numpy()
