"""Building blocks shared by the GAN families: sizes, class conditioning, minibatch discrimination, the D head."""

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

IMAGE_SIZES = (16, 32, 64, 128)
MAX_WIDTH_MULTIPLIER = 8
# scaled_base_channels' product of width and image size: 32 channels at 32 px, 16 at 64 px.
WIDTH_TIMES_SIZE = 1024


def resolution_steps(image_size: int) -> int:
    """Number of 2x resampling steps between 4x4 and `image_size`."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {list(IMAGE_SIZES)}, got {image_size}")
    return int(math.log2(image_size)) - 2


def channel_widths(count: int, base_channels: int) -> list[int]:
    """`count` feature widths from the 4x4 end to the full-resolution end: halving towards it, ending at
    base_channels and capped at base_channels * 8."""
    return [base_channels * min(2 ** (count - 1 - i), MAX_WIDTH_MULTIPLIER) for i in range(count)]


def scaled_base_channels(image_size: int) -> int:
    """The default width for `image_size`: 128 channels at 4x4, halving per doubling (16 px: 64 ... 128 px: 8),
    so parameters stay near 0.3 M for G and a step costs about 1.7x more per doubling of the size (CPU)."""
    resolution_steps(image_size)
    return WIDTH_TIMES_SIZE // image_size


UPSAMPLING = ("transposed", "resize")


def upsampling_conv(in_channels: int, out_channels: int, upsample: str, bias: bool = True) -> nn.Module:
    """A 2x upsampling convolution: `transposed` is a 4x4 stride-2 transposed conv (DCGAN), `resize` is
    nearest-neighbour 2x then a 3x3 conv (Odena et al. 2016): every output pixel gets the same number of
    kernel taps, so the uneven-overlap checkerboard of a stride-2 transposed conv cannot arise."""
    if upsample == "transposed":
        return nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=bias)
    if upsample == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                             nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=bias))
    raise ValueError(f"unknown upsample {upsample!r}; valid: {', '.join(UPSAMPLING)}")


def check_labels(labels: torch.Tensor | None, num_classes: int, batch_size: int) -> torch.Tensor | None:
    """The labels a conditional model needs, validated; None for an unconditional model (which ignores them)."""
    if num_classes == 0:
        return None
    if labels is None:
        raise ValueError(f"this model is class-conditional (num_classes={num_classes}) and needs labels")
    if labels.shape != (batch_size,) or labels.dtype != torch.long:
        raise ValueError(f"labels must be a LongTensor of shape ({batch_size},), got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    return labels


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm2d whose gain and bias are looked up per class (de Vries et al. 2017; Miyato & Koyama 2018)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.shift = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.gain(labels)[:, :, None, None] * self.norm(x) + self.shift(labels)[:, :, None, None]


def batch_norm(num_features: int, num_classes: int) -> nn.Module:
    """Plain BatchNorm2d for an unconditional generator, per-class BatchNorm for a conditional one."""
    return ConditionalBatchNorm2d(num_features, num_classes) if num_classes else nn.BatchNorm2d(num_features)


class ConditionalSequential(nn.Sequential):
    """nn.Sequential that also hands the labels to its ConditionalBatchNorm2d layers."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, labels) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. 2016: for each of `num_kernels` learned projections, how close each sample is to the rest
    of the batch (sum over others of exp(-L1 distance)); a collapsed batch scores high. (N, F) -> (N, F + kernels).
    """

    def __init__(self, in_features: int, num_kernels: int = 100, kernel_dim: int = 5) -> None:
        super().__init__()
        self.num_kernels = num_kernels
        self.kernel_dim = kernel_dim
        self.projection = nn.Linear(in_features, num_kernels * kernel_dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.projection(h).view(h.shape[0], self.num_kernels, self.kernel_dim)
        # Broadcast differences, not cdist: penalties such as R1 need the double backward.
        distances = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(3)  # (N, N, kernels)
        closeness = torch.exp(-distances).sum(1) - 1.0  # drop each sample's exp(0) = 1 with itself
        return torch.cat([h, closeness], dim=1)


class Discriminator(nn.Module):
    """Family trunk -> flat features h -> [minibatch discrimination] -> linear logit, plus the projection term
    <embed(y), h> when class-conditional (Miyato & Koyama 2018). Returns logits of shape (N,)."""

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int = 0,
                 minibatch_discrimination: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.minibatch = MinibatchDiscrimination(feature_dim) if minibatch_discrimination else None
        extra = self.minibatch.num_kernels if self.minibatch is not None else 0
        self.linear = nn.Linear(feature_dim + extra, 1)
        self.embed = nn.Embedding(num_classes, feature_dim) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim), before minibatch discrimination and the head."""
        return self.trunk(x).flatten(1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N,); with `return_features`, (logits, features) from one pass (through a DDP wrapper too)."""
        labels = check_labels(labels, self.num_classes, x.shape[0])
        h = self.features(x)
        logits = self.linear(self.minibatch(h) if self.minibatch is not None else h).squeeze(1)
        if self.embed is not None:
            logits = logits + (self.embed(labels) * h).sum(1)
        return (logits, h) if return_features else logits


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral norm (Miyato et al. 2018) on every Conv2d, Linear and Embedding of `module` not yet normalised."""
    layers = [layer for layer in module.modules() if isinstance(layer, (nn.Conv2d, nn.Linear, nn.Embedding))]
    for layer in layers:
        if not parametrize.is_parametrized(layer, "weight"):
            spectral_norm(layer)
    return module
