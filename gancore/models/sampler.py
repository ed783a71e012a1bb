"""A generator behind a one-tensor interface, for serving (MLflow pyfunc takes a single array)."""

import torch
from torch import nn


class Sampler(nn.Module):
    """Input (N, latent_dim) latents, or (N, latent_dim + 1) with the class id last for a conditional generator.

    Called with labels, as `generate_images` does, it is the generator itself.
    """

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.latent_dim = generator.latent_dim
        self.num_classes = generator.num_classes

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None and self.num_classes:
            if inputs.shape[1] != self.latent_dim + 1:
                raise ValueError(f"a conditional generator takes (N, {self.latent_dim + 1}) inputs: "
                                 f"{self.latent_dim} latents and the class id (0..{self.num_classes - 1}) last")
            inputs, labels = inputs[:, :-1], inputs[:, -1].round().long()
        return self.generator(inputs, labels)

    def example_inputs(self, n: int, seed: int = 0) -> torch.Tensor:
        """A valid input batch: standard normal latents (and classes 0, 1, ... when conditional)."""
        latents = torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(seed))
        if not self.num_classes:
            return latents
        return torch.cat([latents, (torch.arange(n) % self.num_classes).float()[:, None]], dim=1)
