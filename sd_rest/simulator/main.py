"""The stand-in for the repository's main.py (its training entry point). inpaint.py imports
`instantiate_from_config` from here, which main.py itself imports from ldm.util."""

from ldm.util import instantiate_from_config

__all__ = ["instantiate_from_config"]
