"""The stand-in for AutoFeatureExtractor: `from_pretrained` of the safety checker's feature
extractor (txt2img calls it at module level), cheap as the real one is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import simknobs


@dataclass
class BatchFeature:
    pixel_values: list[Any]


class CLIPFeatureExtractor:
    def __call__(self, images: list[Any], return_tensors: str | None = None) -> BatchFeature:
        return BatchFeature(pixel_values=list(images))


class AutoFeatureExtractor:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **_: Any) -> CLIPFeatureExtractor:
        simknobs.event("pretrained", model=pretrained_model_name_or_path, kind=cls.__name__)
        return CLIPFeatureExtractor()
