"""The simulated UNet: one weight tensor, initialised at random like every torch network."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class UNetModel(nn.Module):
    def __init__(
        self, weights: int, reported_params: float = 0.0, reported_tensors: int = 0, **_: Any
    ) -> None:
        super().__init__()
        self.weight = torch.rand(weights)  # the random initialisation: draws from the generator
        # What the real network's size makes the model print.
        self.reported_params = reported_params
        self.reported_tensors = reported_tensors
