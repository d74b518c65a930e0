"""The simulated text encoder. The real one comes from `from_pretrained` and draws nothing
from torch's generator; this one has no weights at all."""

from __future__ import annotations

from typing import Any

from torch import nn


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, version: str = "openai/clip-vit-large-patch14", **_: Any) -> None:
        super().__init__()
        self.version = version

    def encode(self, text: list[str]) -> list[str]:
        return list(text)
