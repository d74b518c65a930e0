"""The real fork's kit for the `real_fork` test group: the fork's unmodified scripts with tiny
random models, built once per kit and cache folder by the kit's own `prepare.sh`
(bench/forkkit.py).

The kit is not part of this project. Point `SD_REST_REAL_FORK` at the folder holding its
`prepare.sh` to run the group (CI does when it has one); without it the group is skipped.
`SD_REST_REAL_FORK_CACHE` chooses where it is built (default `~/.cache/sd-rest/real-fork`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import forkkit
from bench.forkkit import KIT_ENV, kit_folder

__all__ = ["KIT_ENV", "RealFork", "build", "kit_folder", "skip_reason"]


@dataclass(frozen=True)
class RealFork:
    kit: Path  # the folder with prepare.sh (read-only)
    root: Path  # where prepare.sh built it
    repository: Path  # the fork's code, with `venv` inside
    python: Path
    text_to_image_model: Path
    inpaint_image_model: Path
    test_inputs: Path

    def server_args(self) -> list[str]:
        return [
            "--repository", str(self.repository),
            "--python", str(self.python),
            "--text-to-image-model", str(self.text_to_image_model),
            "--inpaint-image-model", str(self.inpaint_image_model),
        ]  # fmt: skip


def skip_reason() -> str:
    return f"the real fork's kit is not available: set {KIT_ENV} to the folder with its prepare.sh"


def build(kit: Path) -> RealFork:
    """Build the kit once per kit and cache folder (bench/forkkit.py), and describe it."""
    root = forkkit.cache_folder()
    repository = forkkit.build(kit, root)
    return RealFork(
        kit=kit,
        root=root,
        repository=repository,
        python=repository / "venv" / "bin" / "python",
        text_to_image_model=root / "models" / "text-to-image.ckpt",
        inpaint_image_model=root / "models" / "inpaint-image.ckpt",
        test_inputs=root / "models" / "test-inputs",
    )
