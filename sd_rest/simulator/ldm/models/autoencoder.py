"""The simulated first stages (the image <-> latent autoencoders): one weight tensor each,
initialised at random, with the lines the real ones print while they are built."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class DiagonalGaussianDistribution:
    """What the encoder returns; sampling it draws from torch's generator (on a Mac this is
    the CPU generator too, hence a draw the resident worker must keep in step)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self) -> Tensor:
        return torch.randn(self.shape)


class AutoencoderKL(nn.Module):
    def __init__(self, weights: int, z_shape: list[int], **_: Any) -> None:
        super().__init__()
        print("making attention of type 'vanilla' with 512 in_channels", flush=True)
        self.weight = torch.rand(weights)  # the random initialisation: draws from the generator
        shape = tuple(z_shape)
        print(f"Working with z of shape {shape} = {math.prod(shape)} dimensions.", flush=True)
        print("making attention of type 'vanilla' with 512 in_channels", flush=True)

    def encode(self, latent_shape: tuple[int, ...]) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(latent_shape)


class VQModelInterface(AutoencoderKL):
    """inpainting_big's first stage, which is also its conditioning stage."""
