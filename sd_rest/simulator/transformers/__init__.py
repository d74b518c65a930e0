"""The simulator's stand-in for transformers: only the feature extractor txt2img loads, defined
where the real one is (transformers.models.auto.feature_extraction_auto)."""

from transformers.models.auto.feature_extraction_auto import AutoFeatureExtractor

__all__ = ["AutoFeatureExtractor"]
