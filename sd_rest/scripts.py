"""How a job becomes a script run: which images it still needs, its folders, its environment.

Everything here is pure: the runner does the I/O; what differs per endpoint (flags, inputs,
where images appear) is in endpoints.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sd_rest.fields import Params

# Columns of the pty: wide enough that tqdm never shortens a bar's label.
PTY_COLUMNS = 240
PTY_ROWS = 24
# The scripts' seeds are 32-bit (numpy's): an out-of-range one is replaced by a random seed,
# so a resumed run's seed wraps around instead.
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class RunPlan:
    """One script run of a job. A resumed job runs only its missing images, seeded
    `seed + done` (modulo 2**32) so the scripts, which seed once per run, do not repeat
    earlier images."""

    done: int  # images already published before this run
    remaining: int  # images this run must deliver
    seed: int
    n_iter: int
    n_samples: int

    def image_number(self, position: int) -> int:
        """Job-wide number (1-based) of this run's `position`-th image (1-based)."""
        return self.done + position

    def progress(self, batches_done: int, fraction: float) -> tuple[int, float]:
        """(1-based index of the image being made, fraction of its steps) once `batches_done`
        batches are finished and the current one is `fraction` done. After the last batch the
        run has no next image: it stays on the last one, finished."""
        if batches_done >= self.n_iter:
            return self.done + self.remaining, 1.0
        return self.done + batches_done * self.n_samples + 1, fraction


def plan_run(params: Params, total: int, done: int) -> RunPlan:
    remaining = total - done
    if remaining <= 0:
        raise ValueError(f"nothing left to run: {done} of {total} images done")
    batch = int(params.get("batchSize", 1))
    return RunPlan(
        done=done,
        remaining=remaining,
        seed=(int(params["seed"]) + done) % SEED_LIMIT,
        n_iter=math.ceil(remaining / batch),
        n_samples=batch,
    )


@dataclass(frozen=True)
class RunFolders:
    """Where one run works: all below `root` (`<job>/run`), removed after the run."""

    root: Path
    outdir: Path  # the script's --outdir
    images: Path  # where its PNGs appear
    cwd: Path  # its working directory

    @property
    def site(self) -> Path:
        """Where a `sitecustomize.py` of ours goes, when the run needs one."""
        return self.root / "site"


def script_environment(
    base: Mapping[str, str], repository: Path, site_dir: Path | None = None
) -> dict[str, str]:
    """The environment of sd-scripts.md. `site_dir` holds our sitecustomize (inpaint's seed)."""
    env = dict(base)
    path = [str(site_dir)] if site_dir else []
    env["PYTHONPATH"] = ":".join([*path, str(repository)])
    env["PYTORCH_ENABLE_MPS_FALLBACK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # A virtualenv activated around the server must not leak into the fork's interpreter.
    env.pop("PYTHONHOME", None)
    return env


def sitecustomize_source(seed: int) -> str:
    """A script without a seed flag: seed torch when its interpreter starts."""
    return (
        "# Written by sd-rest: inpaint.py has no --seed flag, so seed torch at start-up.\n"
        "try:\n"
        "    import torch\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        f"    torch.manual_seed({int(seed)})\n"
    )
