"""What the three simulated scripts share: the run, its knobs, samplers and output.

Names follow the real repository's functions where a traceback shows them
(make_schedule, put_watermark, ...), so that the simulator's crashes read like the real ones.
Knobs come from environment variables the real scripts ignore; see the simulator's README.md.
Importing this module stands for importing the real scripts' libraries: it takes
SD_SIM_IMPORT_SECONDS and prints the kind of warning they print, once per interpreter.
"""

from __future__ import annotations

import argparse
import array
import io
import os
import random
import signal
import struct
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from typing import Any

import simknobs
import torch  # the simulator's stand-in, from the repository root
from PIL import Image
from simknobs import Knobs, append_json_line

from ldm.progress import track

DDPM_TIMESTEPS = 1000
SEED_MAX = 2**32 - 1  # what numpy accepts, hence Lightning's seed_everything
WATERMARK_MIN_PIXELS = 256 * 256
UNET_DOWNSAMPLINGS = 3
WRITE_CHUNKS = 8
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


class Run:
    """One script execution: its knobs and the step and batch counters across batches."""

    def __init__(self, script: str, knobs: Knobs) -> None:
        self.script = script
        self.knobs = knobs
        self.steps_taken = 0
        self.batch = 0

    def event(self, event: str, **fields: Any) -> None:
        if self.knobs.event_log:
            simknobs.event(event, **fields)

    def denoise(self, desc: str, total: int, first_step_check: Callable[[], None] | None) -> None:
        """The sampler loop: one bar over `total` steps, each taking step_seconds."""
        batch = self.batch
        self.batch += 1

        def drawn(n: int, bar_total: int | None) -> None:
            self.event("step", batch=batch, step=n, total=bar_total)

        for i in track(range(total), desc=desc, total=total, on_draw=drawn):
            self.steps_taken += 1
            if self.steps_taken == self.knobs.fail_at_step:
                raise RuntimeError(f"simulated failure at step {self.steps_taken}")
            if self.knobs.exit_at_step and self.steps_taken == self.knobs.exit_at_step[0]:
                os._exit(self.knobs.exit_at_step[1])
            if self.steps_taken == self.knobs.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if i == 0 and first_step_check is not None:
                first_step_check()
            time.sleep(self.knobs.step_seconds)


def start(script: str) -> Run:
    """What happens before argument parsing: the knobs of this run, its argv logged."""
    run = Run(script, Knobs.from_env(os.environ))
    if run.knobs.argv_log:
        append_json_line(
            run.knobs.argv_log,
            {"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "script": script},
        )
    return run


def _site_packages_file(relative: str) -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], relative)


def library_warning() -> None:
    """The kind of noise the real scripts' libraries print first; parsers must ignore it."""
    sys.stderr.write(
        f"{_site_packages_file('lightning_fabric/__init__.py')}:29: UserWarning: "
        "pkg_resources is deprecated as an API. "
        "See https://setuptools.pypa.io/en/latest/pkg_resources.html\n"
        '  __import__("pkg_resources").declare_namespace(__name__)\n'
    )
    sys.stderr.flush()


def _import_libraries() -> None:
    """What importing torch, transformers, Lightning and the rest costs and prints."""
    time.sleep(simknobs.knobs().import_seconds)
    library_warning()
    simknobs.event("import")


_import_libraries()


def seed_everything(seed: int) -> int:
    """Lightning's behaviour: an out-of-range seed is replaced by a random one, with a warning."""
    if not 0 <= seed <= SEED_MAX:
        sys.stderr.write(
            f"{_site_packages_file('lightning_fabric/utilities/seed.py')}:40: UserWarning: "
            f"{seed} is not in bounds, numpy accepts from 0 to {SEED_MAX}\n"
        )
        seed = random.randint(0, SEED_MAX)
    torch.manual_seed(seed)
    sys.stderr.write(f"Global seed set to {seed}\n")
    sys.stderr.flush()
    return seed


def sampling_parser(script: str) -> argparse.ArgumentParser:
    """txt2img's and img2img's flags: the same names and defaults as the real scripts."""
    is_txt2img = script == "txt2img"
    parser = argparse.ArgumentParser()
    add = parser.add_argument
    add("--prompt", type=str, nargs="?", default=DEFAULT_PROMPT, help="the prompt to render")
    if not is_txt2img:
        add("--init-img", type=str, nargs="?", help="path to the input image")
    add(
        "--outdir",
        type=str,
        nargs="?",
        default=f"outputs/{script}-samples",
        help="dir to write results to",
    )
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples")
    add("--ddim_steps", type=int, default=50, help="number of ddim sampling steps")
    add("--plms", action="store_true", help="use plms sampling")
    add("--laion400m", action="store_true", help="uses the LAION400M model")
    add("--fixed_code", action="store_true", help="use the same starting code across samples")
    add("--ddim_eta", type=float, default=0.0, help="ddim eta (eta=0.0 is deterministic)")
    add("--n_iter", type=int, default=1, help="sample this often")
    if is_txt2img:
        add("--H", type=int, default=512, help="image height, in pixel space")
        add("--W", type=int, default=512, help="image width, in pixel space")
    add("--C", type=int, default=4, help="latent channels")
    add("--f", type=int, default=8, help="downsampling factor")
    add(
        "--n_samples",
        type=int,
        default=1 if is_txt2img else 2,
        help="how many samples to produce for each given prompt, i.e. the batch size",
    )
    add("--n_rows", type=int, default=0, help="rows in the grid (default: n_samples)")
    add(
        "--scale",
        type=float,
        default=7.5 if is_txt2img else 5.0,
        help="unconditional guidance scale",
    )
    if not is_txt2img:
        add("--strength", type=float, default=0.75, help="strength for noising the init image")
    add("--from-file", type=str, help="if specified, load prompts from this file")
    add(
        "--config",
        type=str,
        default="configs/stable-diffusion/v1-inference.yaml",
        help="path to config which constructs model",
    )
    add(
        "--ckpt",
        type=str,
        default="models/ldm/stable-diffusion-v1/model.ckpt",
        help="path to checkpoint of model",
    )
    add("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    add(
        "--precision",
        type=str,
        choices=["full", "autocast"],
        default="autocast",
        help="evaluate at this precision",
    )
    return parser


def laion400m_fallback(opt: argparse.Namespace, script: str) -> None:
    print("Falling back to LAION 400M model...", flush=True)
    opt.config = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
    opt.ckpt = "models/ldm/text2img-large/model.ckpt"
    opt.outdir = f"outputs/{script}-samples-laion400m"


def prompt_batches(prompt: str | None, from_file: str | None, batch_size: int) -> list[list[str]]:
    if not from_file:
        assert prompt is not None
        return [batch_size * [prompt]]
    print(f"reading prompts from {from_file}", flush=True)
    with open(from_file, encoding="utf-8") as lines:
        prompts = lines.read().splitlines()
    return [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]


def make_ddim_timesteps(steps: int) -> list[int]:
    """Evenly spaced DDPM timesteps, shifted by one as the real schedule does."""
    stride = DDPM_TIMESTEPS // steps
    return [t + 1 for t in range(0, DDPM_TIMESTEPS, stride)]


def make_ddim_sampling_parameters(timesteps: list[int]) -> list[int]:
    """Looks up each timestep in the 1000-entry alpha table; the shift by one can overrun it."""
    if not timesteps:
        raise IndexError("tensors used as indices must be long, int, byte or bool tensors")
    for t in timesteps:
        if t >= DDPM_TIMESTEPS:
            raise IndexError(
                f"index {t} is out of bounds for dimension 0 with size {DDPM_TIMESTEPS}"
            )
    return timesteps


def unet_size_mismatch(size: int) -> tuple[int, int] | None:
    """Where the UNet's skip connections stop lining up for a latent side of `size`, if they do:
    (upsampled size, skip size). Each downsampling is a stride-2 convolution with padding 1."""
    sizes = [size]
    for _ in range(UNET_DOWNSAMPLINGS):
        sizes.append((sizes[-1] - 1) // 2 + 1)
    upsampled = sizes[-1]
    for skip in reversed(sizes[:-1]):
        upsampled *= 2
        if upsampled != skip:
            return upsampled, skip
    return None


def check_unet_sizes(latent_height: int, latent_width: int) -> None:
    for side in (latent_height, latent_width):
        mismatch = unet_size_mismatch(side)
        if mismatch:
            raise RuntimeError(
                "Sizes of tensors must match except in dimension 1. Expected size "
                f"{mismatch[0]} but got size {mismatch[1]} for tensor number 1 in the list."
            )


class Sampler:
    """DDIM or PLMS: the schedule, its printed lines, its noise, its bar and its failures.

    The noise comes from torch's generator, after the model's random initialisation drew from
    it, and the pictures depend on it: a process whose generator is not where a run by hand
    leaves it paints other pictures."""

    def __init__(self, kind: str, run: Run) -> None:
        self.kind = kind
        self.run = run
        self.timesteps: list[int] = []
        self.steps = 0

    def make_schedule(self, steps: int, eta: float) -> list[int]:
        if self.kind == "PLMS" and eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        self.timesteps = make_ddim_sampling_parameters(make_ddim_timesteps(steps))
        self.steps = steps
        return self.timesteps

    def sample(
        self,
        steps: int,
        batch_size: int,
        shape: tuple[int, ...],
        eta: float,
        first_step_check: Callable[[], None] | None = None,
        x_T: torch.Tensor | None = None,  # the real keyword
    ) -> torch.Tensor:
        """The batch's latents: its start code (x_T, or noise drawn now), denoised."""
        self.make_schedule(steps, eta)
        size = (batch_size, *shape)
        if self.kind == "PLMS":
            print(f"Data shape for PLMS sampling is {size}", flush=True)
        else:
            print(f"Data shape for DDIM sampling is {size}, eta {eta}", flush=True)
        latents = torch.randn(size) if x_T is None else x_T
        total = len(self.timesteps)
        print(f"Running {self.kind} Sampling with {total} timesteps", flush=True)
        self.run.denoise(f"{self.kind} Sampler", total, first_step_check)
        return latents

    def stochastic_encode(self, init_latent: torch.Tensor, t_enc: int) -> torch.Tensor:
        """Noises the init latent to step t_enc, an index into the schedule's alphas.

        Past the end of the table this is the real out-of-bounds crash. sd-scripts.md
        documents strength 1.0 (t_enc = --ddim_steps) as a crash for every step count, also
        when the schedule has one entry more than the steps; the simulator keeps to that.
        """
        noise = torch.randn_like(init_latent)
        size = min(len(self.timesteps), self.steps)
        if not 0 <= t_enc < size:
            raise RuntimeError(f"index {t_enc} is out of bounds for dimension 0 with size {size}")
        values = [a + b for a, b in zip(init_latent.numpy(), noise.numpy(), strict=True)]
        return torch.Tensor(array.array("f", values), init_latent.shape, torch.float32)

    def decode(
        self,
        noised: torch.Tensor,
        t_start: int,
        first_step_check: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        total = len(self.timesteps[:t_start])
        print(f"Running DDIM Sampling with {total} timesteps", flush=True)
        self.run.denoise("Decoding image", total, first_step_check)
        return noised


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def padded(data: bytes, size: int) -> bytes:
    """`data` with a private ancillary chunk (`siPd`, which every reader skips) before IEND
    making it at least `size` bytes: a photo-sized file from a placeholder picture."""
    missing = size - len(data)
    if missing <= 0:
        return data
    body = b"\0" * max(missing - 12, 0)
    chunk = struct.pack(">I", len(body)) + b"siPd" + body
    chunk += struct.pack(">I", zlib.crc32(b"siPd" + body) & 0xFFFFFFFF)
    return data[:-12] + chunk + data[-12:]


def save_png(image: Image.Image, path: str, run: Run) -> None:
    """Written in place like PIL's save, optionally slowly so half-written files can be seen."""
    data = padded(encode_png(image), run.knobs.png_bytes)
    pause = run.knobs.write_seconds
    with open(path, "wb") as out:
        if pause <= 0:
            out.write(data)
        else:
            chunk = -(-len(data) // WRITE_CHUNKS)
            for i in range(0, len(data), chunk):
                if i:
                    time.sleep(pause / (WRITE_CHUNKS - 1))
                out.write(data[i : i + chunk])
                out.flush()
    run.event("image", path=os.path.abspath(path))


class WatermarkEncoder:
    """The invisible-watermark library's size limit is all that matters here."""

    def encode(self, image: Image.Image, method: str = "dwtDct") -> Image.Image:
        width, height = image.size
        if width * height < WATERMARK_MIN_PIXELS:
            raise RuntimeError("image too small, should be larger than 256x256")
        return image


def put_watermark(image: Image.Image, encoder: WatermarkEncoder) -> Image.Image:
    return encoder.encode(image, "dwtDct")


def make_grid(images: list[Image.Image], per_row: int, padding: int = 2) -> Image.Image:
    """Images in rows of `per_row` on black, `padding` pixels around each one."""
    if not images:
        raise RuntimeError("stack expects a non-empty TensorList")
    width, height = images[0].size
    columns = min(per_row, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new(
        "RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding)
    )
    for k, image in enumerate(images):
        row, column = divmod(k, columns)
        grid.paste(
            image, (column * (width + padding) + padding, row * (height + padding) + padding)
        )
    return grid


def finish(outpath: str) -> None:
    print(f"Your samples are ready and waiting for you here: \n{outpath} \n \nEnjoy.", flush=True)
