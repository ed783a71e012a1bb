"""Small domain classifier whose penultimate layer is the metric feature space."""

import torch
from torch import nn

STEM_SIZE = 32  # the resolution the convolutions past the stem work at


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    # GroupNorm, not BatchNorm: features must not depend on batch composition or train/eval mode.
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
    ]


def _stem(in_channels: int, image_size: int) -> list[nn.Module]:
    # Past 32 px, 4x4 stride-2 convolutions bring the image to 32 px, so the net costs about what it does at
    # 32 px while its first layer still sees every pixel (benchmarks/feature_space.py checks what it sees).
    layers = []
    while image_size > STEM_SIZE:
        layers += [nn.Conv2d(in_channels, 16, 4, stride=2, padding=1, bias=False), nn.GroupNorm(8, 16),
                   nn.ReLU(inplace=True)]
        in_channels, image_size = 16, image_size // 2
    return layers


class Classifier(nn.Module):
    """CNN for (N, channels, H, W) images in [-1, 1]; any H, W of at least 8 pixels."""

    def __init__(self, channels: int, image_size: int, num_classes: int, feature_dim: int = 128) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"Classifier needs image_size >= 8, got {image_size}")
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            *(_stem(channels, image_size) if image_size > STEM_SIZE else _conv_block(channels, 16)),
            nn.MaxPool2d(2),
            *_conv_block(16, 32),
            nn.MaxPool2d(2),
            *_conv_block(32, 64),
            # A fixed 4x4 grid keeps the head independent of image_size (28 and 32 both work).
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, shape (N, feature_dim)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.head(self.body(x))
