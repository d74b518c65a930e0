"""sd-rest: Stable Diffusion behind a REST API, a drop-in for stable-diffusion-rest-api."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sd-rest")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
