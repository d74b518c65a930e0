"""What the two commands (the server's and `worker`'s) make of the paths they are given: the
repository when none is named, the interpreter inside it, and demo mode's placeholder
checkpoints unless the user named others."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

import click

from sd_rest.setup.demo import SIMULATOR, demo_checkpoint

DEFAULT_REPOSITORY: Final = "./stable-diffusion"
VENDORED_REPOSITORY: Final = "./vendor/stable-diffusion"


def exists(path: str) -> bool:
    """Whether `path` is there; one out of reach counts as there (its check says why)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:
        return False


def repository(given: str | None) -> Path:
    """The repository named, else ./stable-diffusion, else the vendored one when only it is
    there."""
    if given is not None:
        return Path(given)
    if not exists(DEFAULT_REPOSITORY) and exists(VENDORED_REPOSITORY):
        return Path(VENDORED_REPOSITORY)
    return Path(DEFAULT_REPOSITORY)


def scripts_and_python(
    given_repository: str | None, given_python: str | None, demo: bool
) -> tuple[Path, Path]:
    """(repository, interpreter): the simulator and this interpreter in demo mode, else the
    repository and its venv's python, unless named."""
    if demo:
        return SIMULATOR, Path(given_python) if given_python else Path(sys.executable)
    repo = repository(given_repository)
    return repo, Path(given_python) if given_python else repo / "venv" / "bin" / "python"


def demo_models(ctx: click.Context, text_to_image: str, inpaint: str) -> tuple[str, str]:
    """In demo mode, the simulator's placeholder checkpoints, but for a model the user named
    (`--text-to-image-model`, `--inpaint-image-model`) or whose default path holds a file."""

    def pick(given: str, model: str) -> str:
        source = ctx.get_parameter_source(f"{model.replace('-', '_')}_model")
        if source is not click.core.ParameterSource.DEFAULT or is_file(given):
            return given
        return str(demo_checkpoint(model))

    return pick(text_to_image, "text-to-image"), pick(inpaint, "inpaint-image")
