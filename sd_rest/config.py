"""Server settings, resolved once by the CLI and passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .disk import DEFAULT_MIN_FREE
from .listener import DEFAULT_MAX_CONNECTIONS


@dataclass(frozen=True)
class Settings:
    repository: Path  # the Stable Diffusion checkout whose scripts we run
    python: Path  # interpreter that runs those scripts
    text_to_image_model: Path
    inpaint_image_model: Path
    output: Path
    concurrency: int = 1
    max_queue: int = 1000  # waiting jobs; a POST beyond it gets 429
    api_key: str | None = None
    shutdown_grace: float = 3.0  # seconds between interrupting and killing scripts on stop
    min_free_space: int = DEFAULT_MIN_FREE  # bytes kept free on the output disk; see disk.py
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open at once; more are closed at once

    def model_for(self, model: str) -> Path:
        return self.text_to_image_model if model == "text-to-image" else self.inpaint_image_model
