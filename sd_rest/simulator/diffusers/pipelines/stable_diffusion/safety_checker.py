"""The stand-in for StableDiffusionSafetyChecker: txt2img loads it at module level with
`from_pretrained`, which takes SD_SIM_SAFETY_SECONDS (the real one reads 1.2 GB), and runs
every batch through it. It flags nothing."""

from __future__ import annotations

import time
from typing import Any

import simknobs
import torch
from torch import nn


class StableDiffusionSafetyChecker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.rand(8)  # built, hence initialised at random, before its weights load

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, **_: Any
    ) -> StableDiffusionSafetyChecker:
        checker = cls()
        time.sleep(simknobs.knobs().safety_seconds)
        simknobs.event("pretrained", model=pretrained_model_name_or_path, kind=cls.__name__)
        return checker

    def __call__(self, images: list[Any], clip_input: Any) -> tuple[list[Any], list[bool]]:
        return images, [False] * len(images)
