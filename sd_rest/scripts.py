"""How a job becomes a script run: which images it still needs, the argv, the environment.

Everything here is pure: the runner does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .endpoints import ENDPOINTS, IMAGE_TO_IMAGE, INPAINT_IMAGE, TEXT_TO_IMAGE
from .jobs import Params

# Columns of the pty: wide enough that tqdm never shortens a bar's label.
PTY_COLUMNS = 240
PTY_ROWS = 24
INPAINT_CONFIG = Path("models/ldm/inpainting_big/config.yaml")
INPAINT_CHECKPOINT = Path("models/ldm/inpainting_big/last.ckpt")
INPAINT_INPUT_NAME = "image"  # inputs/image.png + inputs/image_mask.png -> <outdir>/image.png
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


def script_path(repository: Path, endpoint: str) -> Path:
    return repository / ENDPOINTS[endpoint].script


def script_arguments(
    endpoint: str,
    params: Params,
    plan: RunPlan,
    *,
    outdir: Path,
    checkpoint: Path,
    init_image: Path | None = None,
    indir: Path | None = None,
) -> list[str]:
    """The script's flags. Every value is passed explicitly (the scripts' defaults differ from
    the API's) and as `--flag=value`, so a value starting with `-` cannot be read as a flag."""
    if endpoint == INPAINT_IMAGE:
        if indir is None:
            raise ValueError("inpaint needs an input folder")
        return [f"--indir={indir}", f"--outdir={outdir}", f"--steps={params['steps']}"]
    args = [
        f"--prompt={params['prompt']}",
        f"--outdir={outdir}",
        "--skip_grid",
        f"--ddim_steps={params['steps']}",
        f"--ddim_eta={float(params['eta'])!r}",
        f"--n_iter={plan.n_iter}",
        f"--n_samples={plan.n_samples}",
        f"--scale={float(params['guidanceScale'])!r}",
        f"--seed={plan.seed}",
        f"--ckpt={checkpoint}",
    ]
    if endpoint == TEXT_TO_IMAGE:
        args += [f"--H={params['height']}", f"--W={params['width']}"]
    elif endpoint == IMAGE_TO_IMAGE:
        if init_image is None:
            raise ValueError("image-to-image needs an init image")
        args += [f"--init-img={init_image}", f"--strength={float(params['strength'])!r}"]
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}")
    return args


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
    """inpaint.py has no seed flag: seed torch when its interpreter starts."""
    return (
        "# Written by sd-rest: inpaint.py has no --seed flag, so seed torch at start-up.\n"
        "try:\n"
        "    import torch\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        f"    torch.manual_seed({int(seed)})\n"
    )
