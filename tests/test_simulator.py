"""The simulator must behave like the real Stable Diffusion scripts (sd-scripts.md).

The scripts run as real subprocesses, the way the server runs them: cwd = the simulator
repository (inpaint: a per-job directory), PYTHONPATH = the repository.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image, ImageChops, ImageDraw

SIM = Path(__file__).resolve().parents[1] / "sd_rest" / "simulator"
CKPT = str(SIM / "models" / "demo" / "text-to-image.ckpt")
INPAINT_CKPT = SIM / "models" / "demo" / "inpaint-image.ckpt"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BAR = re.compile(
    r"(?:(?P<desc>[A-Za-z ]+): )?"
    r"(?:(?P<pct>[ \d]{2}\d)%\|(?P<bar>[ ▏▎▍▌▋▊▉█]{10})\| (?P<n>\d+)/(?P<total>\d+) "
    r"\[\d\d:\d\d<(?:\d\d:\d\d|\?), (?:\?it/s| ?\d+\.\d\d(?:it/s|s/it))\]"
    r"|(?P<count>\d+)it \[\d\d:\d\d, (?:\?it/s| ?\d+\.\d\d(?:it/s|s/it))\])"
)
TIMES = re.compile(r"\[\d\d:\d\d(?:<[^\]]*|, [^\]]*)\]")
WARNING_HEAD = re.compile(r".*: UserWarning: .*")


def load_progress() -> ModuleType:
    """The bar formatter, loaded from its file (no import of the simulator's fake torch)."""
    spec = importlib.util.spec_from_file_location("sim_progress", SIM / "ldm" / "progress.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


progress = load_progress()


def sim_env(pythonpath: str | None = str(SIM), **knobs: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_SIM_")}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    env |= {"PYTORCH_ENABLE_MPS_FALLBACK": "1", "PYTHONUNBUFFERED": "1"}
    env |= {"SD_SIM_LOAD_SECONDS": "0", "SD_SIM_STEP_SECONDS": "0"} | knobs
    return env


def run(
    script: str,
    *args: str,
    cwd: Path = SIM,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    raw = subprocess.run(
        [sys.executable, str(SIM / "scripts" / f"{script}.py"), *args],
        cwd=cwd,
        env=env if env is not None else sim_env(),
        capture_output=True,
        timeout=60,
    )
    # Decoded by hand: text mode would turn the bars' \r into \n.
    return subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode()
    )


def txt2img(outdir: Path, *args: str, **knobs: str) -> subprocess.CompletedProcess[str]:
    return run(
        "txt2img",
        "--prompt=a lighthouse",
        "--ckpt",
        CKPT,
        "--outdir",
        str(outdir),
        "--ddim_steps=4",
        *args,
        env=sim_env(**knobs),
    )


def bar_lines(stderr: str) -> list[str]:
    """What a parser sees: pieces between \\r and \\n, ANSI sequences removed."""
    pieces = (ANSI.sub("", piece) for piece in re.split(r"[\r\n]", stderr))
    return [piece for piece in pieces if piece.strip()]


def failed_with(result: subprocess.CompletedProcess[str], error: str) -> bool:
    last = result.stderr.rstrip().splitlines()[-1]
    return result.returncode == 1 and "Traceback" in result.stderr and last.startswith(error)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
        return image.size


# --- the bar format --------------------------------------------------------------------


def test_format_meter_reproduces_the_sample_lines() -> None:
    fmt = progress.format_meter
    assert fmt(0, 2, 0.0, "Sampling") == "Sampling:   0%|          | 0/2 [00:00<?, ?it/s]"
    assert fmt(2, 8, 0.14, "DDIM Sampler", 14.22) == (
        "DDIM Sampler:  25%|██▌       | 2/8 [00:00<00:00, 14.22it/s]"
    )
    assert fmt(1, 1, 0.65, "data", 1.53) == "data: 100%|██████████| 1/1 [00:00<00:00,  1.53it/s]"
    assert fmt(0, None, 0.0) == "0it [00:00, ?it/s]"
    assert fmt(1, None, 0.2257, "", 4.43) == "1it [00:00,  4.43it/s]"
    # Slower than one step a second, tqdm switches to seconds per iteration.
    assert fmt(3, 50, 66.0, "DDIM Sampler", 0.5) == (
        "DDIM Sampler:   6%|▌         | 3/50 [01:06<01:34,  2.00s/it]"
    )
    assert progress.format_interval(3725) == "1:02:05"


def test_nested_bars_match_the_documented_byte_stream() -> None:
    """txt2img --n_iter 2 --ddim_steps 8 from sd-scripts.md, with a scripted clock."""
    now = [0.0]
    out = io.StringIO()

    def bar(total: int, desc: str) -> object:
        return progress.Bar(total, desc, stream=out, clock=lambda: now[0])

    sampling = bar(2, "Sampling")
    for _ in range(2):
        data = bar(1, "data")
        sampler = bar(8, "DDIM Sampler")
        start = now[0]
        # Redraws happen at steps 2, 4 and 8 only: the others come < 0.1 s after a redraw.
        for at in (0.06, 0.12, 0.18, 0.24, 0.27, 0.30, 0.33, 0.36):
            now[0] = start + at
            sampler.update()
        sampler.close()
        now[0] += 0.3
        data.update()
        data.close()
        sampling.update()
    sampling.close()

    up = "\x1b[A"
    full = "██████████"
    iteration = (
        f"\n\rdata:   0%|          | 0/1 [T]{up}"
        f"\n\n\rDDIM Sampler:   0%|          | 0/8 [T]{up}{up}"
        f"\n\n\rDDIM Sampler:  25%|██▌       | 2/8 [T]{up}{up}"
        f"\n\n\rDDIM Sampler:  50%|█████     | 4/8 [T]{up}{up}"
        f"\n\n\rDDIM Sampler: 100%|{full}| 8/8 [T]{up}{up}\rDDIM Sampler: 100%|{full}| 8/8 [T]\n"
        f"\n\rdata: 100%|{full}| 1/1 [T]{up}\rdata: 100%|{full}| 1/1 [T]\n"
    )
    expected = (
        "\rSampling:   0%|          | 0/2 [T]"
        + iteration
        + "\rSampling:  50%|█████     | 1/2 [T]"
        + iteration
        + f"\rSampling: 100%|{full}| 2/2 [T]\rSampling: 100%|{full}| 2/2 [T]\n"
    )
    assert TIMES.sub("[T]", out.getvalue()) == expected
    # The running rate is smoothed, the closing one is the overall mean.
    assert "8/8 [00:00<00:00, 24.28it/s]" in out.getvalue()
    assert "8/8 [00:00<00:00, 22.22it/s]" in out.getvalue()


# --- txt2img -------------------------------------------------------------------------------


def test_txt2img_numbers_after_existing_files_and_writes_a_grid(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "00000.png").write_bytes(b"old")
    (samples / "notes.txt").write_text("counts too")
    (tmp_path / "grid-0000.png").write_bytes(b"old")

    result = txt2img(tmp_path, "--n_iter=2", "--n_samples=2", "--W=384", "--H=256")

    assert result.returncode == 0, result.stderr
    new = sorted(p.name for p in samples.iterdir() if p.suffix == ".png" and p.name != "00000.png")
    assert new == ["00002.png", "00003.png", "00004.png", "00005.png"]
    assert all(png_size(samples / name) == (384, 256) for name in new)
    # Grid numbering counts the outdir's entries minus samples/; 2 per row, 2px padding.
    assert png_size(tmp_path / "grid-0001.png") == (2 * 386 + 2, 2 * 258 + 2)
    assert result.stdout.count("Running DDIM Sampling with 4 timesteps") == 2
    assert "Your samples are ready and waiting for you here: \n" + str(tmp_path) in result.stdout


def test_skip_grid_and_skip_save(tmp_path: Path) -> None:
    assert txt2img(tmp_path / "a", "--skip_grid").returncode == 0
    assert sorted(os.listdir(tmp_path / "a")) == ["samples"]
    assert os.listdir(tmp_path / "a" / "samples") == ["00000.png"]

    assert txt2img(tmp_path / "b", "--skip_grid", "--skip_save").returncode == 0
    assert os.listdir(tmp_path / "b" / "samples") == []


def test_images_are_deterministic_per_prompt_seed_and_index(tmp_path: Path) -> None:
    def images(name: str, *args: str) -> list[bytes]:
        result = txt2img(tmp_path / name, "--skip_grid", "--n_samples=2", "--W=256", *args)
        assert result.returncode == 0, result.stderr
        return [p.read_bytes() for p in sorted((tmp_path / name / "samples").iterdir())]

    first = images("a", "--seed=5")
    assert images("b", "--seed=5") == first
    assert first[0] != first[1]
    assert images("c", "--seed=6")[0] != first[0]


def test_stderr_carries_warning_seed_and_bars_stdout_the_prints(tmp_path: Path) -> None:
    result = txt2img(tmp_path, "--n_iter=2", "--ddim_steps=8", "--seed=7", "--W=256")

    assert result.returncode == 0
    err = result.stderr
    assert WARNING_HEAD.fullmatch(err.splitlines()[0])
    assert "Global seed set to 7\n\rSampling:   0%|          | 0/2 [00:00<?, ?it/s]\n" in err
    assert (
        "\rdata:   0%|          | 0/1 [00:00<?, ?it/s]\x1b[A\n\n"
        "\rDDIM Sampler:   0%|          | 0/8 [00:00<?, ?it/s]\x1b[A\x1b[A"
    ) in err
    assert re.search(r"\rSampling: 100%\|██████████\| 2/2 \[[^\]]*\]\n$", err)
    bars = [m for line in bar_lines(err) if (m := BAR.fullmatch(line))]
    others = [line for line in bar_lines(err) if not BAR.fullmatch(line)]
    assert len(others) == 3  # the two warning lines and the seed
    sampler = [(int(m["n"]), int(m["total"])) for m in bars if m["desc"] == "DDIM Sampler"]
    assert {total for _, total in sampler} == {8}
    assert sampler[0] == (0, 8) and sampler[-1] == (8, 8)
    assert "Loading model from " + CKPT + "\nGlobal Step: 470000\n" in result.stdout
    assert "Data shape for DDIM sampling is (1, 4, 64, 32), eta 0.0" in result.stdout
    assert "%|" not in result.stdout and "Running" not in err


def test_ddim_schedule_and_plms(tmp_path: Path) -> None:
    result = txt2img(tmp_path / "a", "--ddim_steps=7", "--skip_grid", "--W=256", "--H=256")
    assert "Running DDIM Sampling with 8 timesteps" in result.stdout
    assert "| 8/8 [" in result.stderr

    result = txt2img(tmp_path / "b", "--plms", "--skip_grid", "--W=256", "--H=256")
    assert result.returncode == 0
    assert "Running PLMS Sampling with 4 timesteps" in result.stdout
    assert "\rPLMS Sampler: 100%|██████████| 4/4 [" in result.stderr


def test_schedule_crashes_exactly_for_the_documented_step_counts() -> None:
    code = (
        "from ldm.simulate import make_ddim_sampling_parameters, make_ddim_timesteps\n"
        "bad = []\n"
        "for s in range(1, 1001):\n"
        "    try:\n"
        "        make_ddim_sampling_parameters(make_ddim_timesteps(s))\n"
        "    except IndexError:\n"
        "        bad.append(s)\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=sim_env(), capture_output=True, text=True, check=True
    )
    documented = [3, 9, 27, 36, 37, *range(101, 112), *range(251, 334), *range(501, 1001)]
    assert json.loads(result.stdout) == documented


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--ddim_steps=9"], "IndexError: index 1000 is out of bounds"),
        (["--W=128", "--H=256"], "RuntimeError: image too small, should be larger than 256x256"),
        (["--W=520"], "RuntimeError: Sizes of tensors must match"),
        (["--plms", "--ddim_eta=0.5"], "ValueError: ddim_eta must be 0 for PLMS"),
    ],
)
def test_txt2img_documented_crashes(tmp_path: Path, args: list[str], error: str) -> None:
    assert failed_with(txt2img(tmp_path, *args), error)


def test_missing_checkpoint_fails_after_loading(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ckpt")
    result = txt2img(tmp_path, "--ckpt", missing)
    assert failed_with(
        result, f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}'"
    )
    assert result.stdout.startswith(f"Loading model from {missing}\n")


def test_failure_knob_counts_steps_across_batches(tmp_path: Path) -> None:
    result = txt2img(tmp_path, "--n_iter=2", "--W=256", "--H=256", SD_SIM_FAIL_AT_STEP="6")
    assert failed_with(result, "RuntimeError: simulated failure at step 6")
    assert os.listdir(tmp_path / "samples") == ["00000.png"]


# --- img2img -------------------------------------------------------------------------------


def img2img(
    tmp_path: Path, *args: str, init: Path | None = None
) -> subprocess.CompletedProcess[str]:
    if init is None:
        init = tmp_path / "init.png"
        Image.new("RGB", (330, 200), (200, 40, 40)).save(init)
    return run(
        "img2img",
        "--prompt=a red barn",
        f"--init-img={init}",
        "--ckpt",
        CKPT,
        "--outdir",
        str(tmp_path / "out"),
        "--ddim_steps=8",
        *args,
    )


def test_img2img_output_size_steps_and_defaults(tmp_path: Path) -> None:
    result = img2img(tmp_path)

    assert result.returncode == 0, result.stderr
    samples = tmp_path / "out" / "samples"
    assert sorted(os.listdir(samples)) == ["00000.png", "00001.png"]  # --n_samples 2 default
    assert png_size(samples / "00000.png") == (320, 192)  # cut to multiples of 32
    assert "loaded input image of size (330, 200)" in result.stdout
    assert "target t_enc is 6 steps\n" in result.stdout
    assert "Running DDIM Sampling with 6 timesteps" in result.stdout
    assert "\rDecoding image: 100%|██████████| 6/6 [" in result.stderr
    assert (tmp_path / "out" / "grid-0000.png").exists()


def test_img2img_strength_zero_keeps_the_init_image(tmp_path: Path) -> None:
    result = img2img(tmp_path, "--strength=0", "--n_samples=1")
    assert "Decoding image: 0it [00:00, ?it/s]" in result.stderr
    with Image.open(tmp_path / "out" / "samples" / "00000.png") as out:
        assert out.getcolors() == [(320 * 192, (200, 40, 40))]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--strength=1.0"], "RuntimeError: index 8 is out of bounds"),
        (["--strength=1.0", "--ddim_steps=7"], "RuntimeError: index 7 is out of bounds"),
        (["--plms"], "NotImplementedError: PLMS sampler not (yet) supported"),
        (["--ddim_steps=27"], "IndexError"),
    ],
)
def test_img2img_documented_crashes(tmp_path: Path, args: list[str], error: str) -> None:
    assert failed_with(img2img(tmp_path, *args), error)


def test_img2img_sizes_that_are_not_multiples_of_64_fail_in_the_unet(tmp_path: Path) -> None:
    init = tmp_path / "odd.png"
    Image.new("RGB", (300, 200), (200, 40, 40)).save(init)  # cut to 288×192: 36×24 latent
    result = img2img(tmp_path, init=init)
    assert failed_with(result, "RuntimeError: Sizes of tensors must match")


def test_img2img_checks_the_init_image_after_loading(tmp_path: Path) -> None:
    result = img2img(tmp_path, init=tmp_path / "missing.png")
    assert failed_with(result, "AssertionError")
    assert "Global Step: 470000" in result.stdout


def test_repository_modules_need_pythonpath(tmp_path: Path) -> None:
    for script in ("img2img", "inpaint"):
        result = run(script, "--outdir", str(tmp_path), env=sim_env(pythonpath=None))
        assert failed_with(result, "ModuleNotFoundError: No module named 'ldm'")
    # txt2img puts its repository on sys.path itself.
    result = run("txt2img", "--outdir", str(tmp_path), "--ckpt", CKPT, env=sim_env(None))
    assert result.returncode == 0


def test_argparse_behaves_like_the_real_parser(tmp_path: Path) -> None:
    result = txt2img(tmp_path, "--prompt=-starts with a dash", "--skip_grid", "--W=256")
    assert result.returncode == 0
    result = txt2img(tmp_path, "--width=3")
    assert result.returncode == 2
    assert "error: unrecognized arguments: --width=3" in result.stderr


# --- inpaint -------------------------------------------------------------------------------


def inpaint_job(tmp_path: Path, pairs: dict[str, tuple[Image.Image, Image.Image]]) -> Path:
    """A per-job directory as the server makes it: links to the config and the checkpoint."""
    job = tmp_path / "job"
    model_dir = job / "models" / "ldm" / "inpainting_big"
    model_dir.mkdir(parents=True)
    (model_dir / "config.yaml").symlink_to(
        SIM / "models" / "ldm" / "inpainting_big" / "config.yaml"
    )
    (model_dir / "last.ckpt").symlink_to(INPAINT_CKPT)
    indir = tmp_path / "in"
    indir.mkdir()
    for name, (image, mask) in pairs.items():
        image.save(indir / f"{name}.png")
        mask.save(indir / f"{name}_mask.png")
    return job


def half_mask(size: tuple[int, int]) -> Image.Image:
    """Left half 127 (kept: below the 0.5 threshold), right half 128 (repainted)."""
    mask = Image.new("L", size, 127)
    ImageDraw.Draw(mask).rectangle((size[0] // 2, 0, size[0], size[1]), fill=128)
    return mask


def inpaint(
    tmp_path: Path, job: Path, seed: int | None, out: str
) -> subprocess.CompletedProcess[str]:
    path = str(SIM)
    if seed is not None:
        site = tmp_path / f"site-{seed}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(f"import torch\ntorch.manual_seed({seed})\n")
        path = f"{site}{os.pathsep}{SIM}"
    args = ["--indir", str(tmp_path / "in"), "--outdir", str(tmp_path / out), "--steps=8"]
    return run("inpaint", *args, cwd=job, env=sim_env(path))


def test_inpaint_pairs_masks_thresholds_and_keeps_the_rest(tmp_path: Path) -> None:
    picture = Image.new("RGB", (64, 96), (10, 120, 200))
    job = inpaint_job(
        tmp_path, {"a": (picture, half_mask((64, 96))), "b": (picture, half_mask((64, 96)))}
    )
    Image.new("RGB", (64, 48)).save(tmp_path / "in" / "unpaired.png")

    result = inpaint(tmp_path, job, 7, "out")

    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png"]
    assert result.stdout.startswith("Found 2 inputs.\n")
    assert result.stderr.count("\rDDIM Sampler:   0%|          | 0/8 [00:00<?, ?it/s]\x1b[A") == 2
    assert "\n\r0it [00:00, ?it/s]" in result.stderr
    assert re.search(r"\r2it \[\d\d:\d\d, [^\]]+\]\n$", result.stderr)
    with Image.open(tmp_path / "out" / "a.png") as out:
        assert out.size == (64, 96)
        kept = out.crop((0, 0, 32, 96))
        assert kept.getcolors() == [(32 * 96, (10, 120, 200))]
        assert ImageChops.difference(
            out.crop((32, 0, 64, 96)), picture.crop((32, 0, 64, 96))
        ).getbbox()


def test_inpaint_seed_comes_from_a_sitecustomize(tmp_path: Path) -> None:
    size = (64, 64)
    job = inpaint_job(tmp_path, {"x": (Image.new("RGB", size), Image.new("L", size, 255))})
    runs = {
        name: inpaint(tmp_path, job, seed, name)
        for name, seed in [("s7", 7), ("again", 7), ("s8", 8), ("default", None)]
    }
    assert all(r.returncode == 0 for r in runs.values())
    out = {name: (tmp_path / name / "x.png").read_bytes() for name in runs}
    assert out["s7"] == out["again"]
    assert len({out["s7"], out["s8"], out["default"]}) == 3


def test_inpaint_needs_its_relative_model_files_and_equal_sizes(tmp_path: Path) -> None:
    job = inpaint_job(tmp_path, {"x": (Image.new("RGB", (64, 64)), Image.new("L", (64, 56)))})
    result = inpaint(tmp_path, tmp_path / "in", None, "out")  # cwd without models/
    assert failed_with(result, "FileNotFoundError: [Errno 2] No such file or directory: 'models/")
    result = inpaint(tmp_path, job, None, "out")
    assert failed_with(result, "RuntimeError: The size of tensor a (56) must match")


@pytest.mark.parametrize(
    ("size", "message"),
    [
        # What the real inpaint.py prints for these sizes (its UNet floors odd sides).
        ((264, 264), "Expected size 32 but got size 33 for tensor number 1 in the list."),
        ((272, 256), "Expected size 16 but got size 17 for tensor number 1 in the list."),
    ],
)
def test_inpaint_fails_on_sides_that_are_not_multiples_of_32(
    tmp_path: Path, size: tuple[int, int], message: str
) -> None:
    job = inpaint_job(tmp_path, {"x": (Image.new("RGB", size), Image.new("L", size, 255))})
    result = inpaint(tmp_path, job, None, "out")
    prefix = "RuntimeError: Sizes of tensors must match except in dimension 1."
    assert failed_with(result, f"{prefix} {message}")


# --- the model: built like the real one, drawing from torch's generator ------------------

BUILD = """
import json, torch
from omegaconf import OmegaConf
from ldm.util import instantiate_from_config

def state():
    return torch.get_rng_state().numpy().tobytes()

def build(path):
    return instantiate_from_config(OmegaConf.load(path).model)

torch.manual_seed(42)
start = state()
model = build("configs/stable-diffusion/v1-inference.yaml")
end, weights = state(), model.state_dict()["model.diffusion_model.weight"].clone()
torch.set_rng_state(torch.frombuffer(bytearray(start)))
again = build("configs/stable-diffusion/v1-inference.yaml")
torch.set_rng_state(torch.frombuffer(bytearray(start)))
build("models/ldm/inpainting_big/config.yaml")
print(json.dumps({
    "drew": end != start,
    "same_end": state() == end,
    "same_weights": torch.equal(weights, again.state_dict()["model.diffusion_model.weight"]),
    "keys": list(model.state_dict()),
    "training": [m.training for m in model.modules()],
}))
"""


def test_a_model_build_draws_from_the_generator_the_same_way_for_a_seed() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BUILD], cwd=SIM, env=sim_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["drew"] and found["same_weights"]
    assert found["keys"] == ["model.diffusion_model.weight", "first_stage_model.weight"]
    assert all(found["training"])
    # The constructors print what the real ones print, the nested networks' lines included.
    assert result.stdout.splitlines()[:5] == [
        "LatentDiffusion: Running in eps-prediction mode",
        "DiffusionWrapper has 859.52 M params.",
        "making attention of type 'vanilla' with 512 in_channels",
        "Working with z of shape (1, 4, 32, 32) = 4096 dimensions.",
        "making attention of type 'vanilla' with 512 in_channels",
    ]
    assert "Keeping EMAs of 628." in result.stdout


def test_images_depend_on_the_checkpoints_bytes(tmp_path: Path) -> None:
    same, other = tmp_path / "same.ckpt", tmp_path / "other.ckpt"
    same.write_bytes(Path(CKPT).read_bytes())
    other.write_bytes(Path(CKPT).read_bytes() + b" ")

    def image(name: str, ckpt: Path | str) -> bytes:
        result = txt2img(tmp_path / name, "--skip_grid", "--W=256", "--H=256", "--ckpt", str(ckpt))
        assert result.returncode == 0, result.stderr
        return (tmp_path / name / "samples" / "00000.png").read_bytes()

    reference = image("reference", CKPT)
    assert image("same", same) == reference
    assert image("other", other) != reference


# --- knobs ---------------------------------------------------------------------------------


def test_argv_and_event_logs(tmp_path: Path) -> None:
    prompt = 'a "quoted" $(rm -rf /) `tick` prompt\nwith a newline and ünïcode'
    argv_log, event_log = tmp_path / "argv.jsonl", tmp_path / "events.jsonl"
    result = txt2img(
        tmp_path / "out",
        f"--prompt={prompt}",
        "--n_iter=2",
        "--W=256",
        "--H=256",
        SD_SIM_ARGV_LOG=str(argv_log),
        SD_SIM_EVENT_LOG=str(event_log),
    )

    assert result.returncode == 0, result.stderr
    (logged,) = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert f"--prompt={prompt}" in logged["argv"]
    assert logged["cwd"] == str(SIM) and logged["script"] == "txt2img" and logged["pid"] > 0
    events = [json.loads(line) for line in event_log.read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    images = [e for e in events if e["event"] == "image"]
    assert {e["batch"] for e in steps} == {0, 1} and {e["total"] for e in steps} == {4}
    assert steps[0]["step"] == 0 and steps[-1]["step"] == 4
    # Step events equal the sampler redraws actually printed.
    assert len(steps) == result.stderr.count("\rDDIM Sampler:")
    assert [Path(e["path"]).name for e in images] == ["00000.png", "00001.png", "grid-0000.png"]
    first_image = events.index(images[0])
    assert all(e["batch"] == 0 for e in events[:first_image] if e["event"] == "step")
    assert all(e["t"] <= f["t"] for e, f in itertools.pairwise(events))


def test_time_knobs_and_the_events_of_a_run(tmp_path: Path) -> None:
    event_log = tmp_path / "events.jsonl"
    started = time.time()
    result = txt2img(
        tmp_path / "out",
        "--skip_grid",
        "--W=256",
        "--H=256",
        SD_SIM_IMPORT_SECONDS="0.2",
        SD_SIM_SAFETY_SECONDS="0.2",
        SD_SIM_LOAD_SECONDS="0.3",
        SD_SIM_BUILD_SECONDS="0.2",
        SD_SIM_STEP_SECONDS="0.05",
        SD_SIM_EVENT_LOG=str(event_log),
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in event_log.read_text().splitlines()]
    assert len({e["pid"] for e in events}) == 1
    kinds = [e["event"] for e in events if e["event"] not in ("step", "image")]
    assert kinds == ["import", "pretrained", "pretrained", "checkpoint", "build"]
    pretrained = [e["kind"] for e in events if e["event"] == "pretrained"]
    assert pretrained == ["AutoFeatureExtractor", "StableDiffusionSafetyChecker"]
    at = {e["event"]: e["t"] for e in events if e["event"] != "pretrained"}
    at["safety"] = events[2]["t"]
    first_step = next(e["t"] for e in events if e["event"] == "step")
    last_step = [e["t"] for e in events if e["event"] == "step"][-1]
    # Sleeps only ever last at least as long as asked: these are lower bounds.
    assert at["import"] - started >= 0.2
    assert at["safety"] - at["import"] >= 0.2
    assert at["checkpoint"] - at["safety"] >= 0.3
    assert at["build"] - at["checkpoint"] >= 0.2
    assert first_step >= at["build"]
    assert last_step - first_step >= 4 * 0.05


def test_slow_writes_expose_half_written_files(tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    target = outdir / "samples" / "00000.png"
    command = [sys.executable, str(SIM / "scripts" / "txt2img.py"), "--ckpt", CKPT]
    command += ["--outdir", str(outdir), "--ddim_steps=4", "--skip_grid"]
    env = sim_env(SD_SIM_WRITE_SECONDS="0.8")
    seen_partial = False
    with subprocess.Popen(
        command, cwd=SIM, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as process:
        while process.poll() is None:
            if target.exists() and not target.read_bytes().endswith(b"IEND\xaeB`\x82"):
                seen_partial = True
            time.sleep(0.005)
    assert process.returncode == 0
    assert seen_partial
    assert png_size(target) == (512, 512)
