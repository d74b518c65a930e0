"""The stand-in for transformers.models.auto."""
