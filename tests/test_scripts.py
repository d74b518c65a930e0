"""The pieces between a job and a script run: run plans, each endpoint's flags, folders and
outputs, and the scripts' environment."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sd_rest.endpoints import ENDPOINTS, INPAINT_CHECKPOINT, INPAINT_CONFIG
from sd_rest.fields import Params
from sd_rest.scripts import (
    RunFolders,
    RunPlan,
    plan_run,
    script_environment,
    sitecustomize_source,
)

from helpers import SIMULATOR

OUT = Path("/jobs/x/run/out")
CKPT = Path("/models/text-to-image.ckpt")
INPUTS = Path("/jobs/x/inputs")
FOLDERS = RunFolders(root=Path("/jobs/x/run"), outdir=OUT, images=OUT / "samples", cwd=Path("/r"))


def script_arguments(endpoint: str, params: Params, plan: RunPlan) -> list[str]:
    return ENDPOINTS[endpoint].arguments(params, plan, FOLDERS, CKPT, INPUTS)


def txt2img_params(**changes: object) -> dict:
    params = {k: v for k, v in ENDPOINTS["text-to-image"].defaults.items()}
    params["prompt"] = "a cat"
    params.update(changes)
    return params


def parse(args: list[str]) -> dict[str, str]:
    """How argparse (which the scripts use) reads our flags: each --flag=value is one value."""
    parser = argparse.ArgumentParser()
    for arg in args:
        name = arg.split("=", 1)[0]
        if "=" in arg:
            parser.add_argument(name, type=str)
        else:
            parser.add_argument(name, action="store_true")
    return vars(parser.parse_args(args))


def test_text_to_image_maps_every_field() -> None:
    params = txt2img_params(
        iterations=3,
        batchSize=2,
        steps=20,
        seed=7,
        width=640,
        height=384,
        guidanceScale=9.0,
        eta=0.5,
    )
    plan = plan_run(params, total=6, done=0)
    args = parse(script_arguments("text-to-image", params, plan))
    assert args == {
        "prompt": "a cat",
        "outdir": str(OUT),
        "skip_grid": True,
        "ddim_steps": "20",
        "ddim_eta": "0.5",
        "n_iter": "3",
        "n_samples": "2",
        "scale": "9.0",
        "seed": "7",
        "ckpt": str(CKPT),
        "H": "384",
        "W": "640",
    }


def test_image_to_image_maps_every_field() -> None:
    params = {k: v for k, v in ENDPOINTS["image-to-image"].defaults.items()}
    params.update(prompt="autumn", strength=0.3, steps=30, seed=1, iterations=2)
    plan = plan_run(params, total=2, done=0)
    args = parse(script_arguments("image-to-image", params, plan))
    assert args["init_img"] == str(INPUTS / "image.png")
    assert args["strength"] == "0.3"
    assert args["ddim_steps"] == "30"
    assert args["n_iter"] == "2"
    assert args["n_samples"] == "1"  # img2img's own default is 2: always passed
    assert args["scale"] == "7.5"  # img2img's own default is 5.0: always passed
    assert "H" not in args and "W" not in args


def test_inpaint_passes_only_its_three_flags() -> None:
    params = {"steps": 32, "seed": 42}
    plan = plan_run(params, total=1, done=0)
    assert script_arguments("inpaint-image", params, plan) == [
        f"--indir={INPUTS}",
        f"--outdir={OUT}",
        "--steps=32",
    ]
    assert ENDPOINTS["inpaint-image"].start_seed(plan) == 42  # no seed flag: torch is seeded
    assert ENDPOINTS["text-to-image"].start_seed(plan) is None


@pytest.mark.parametrize(
    "prompt",
    ['say "hi"', "$(rm -rf ~)", "`id`", "line\nbreak", "-n 5", "--outdir=/etc", "日本語 🎨", "a=b"],
)
def test_prompt_is_one_verbatim_argument(prompt: str) -> None:
    params = txt2img_params(prompt=prompt)
    args = script_arguments("text-to-image", params, plan_run(params, 1, 0))
    prompts = [a for a in args if a.startswith("--prompt=")]
    assert prompts == [f"--prompt={prompt}"]
    assert parse(args)["prompt"] == prompt
    assert parse(args)["outdir"] == str(OUT)


def test_resume_plan_runs_only_the_missing_images_with_shifted_seed() -> None:
    params = txt2img_params(iterations=3, batchSize=2, seed=100)
    plan = plan_run(params, total=6, done=4)
    assert (plan.remaining, plan.seed, plan.n_iter, plan.n_samples) == (2, 104, 1, 2)
    assert plan.image_number(1) == 5
    assert plan.progress(0, 0.5) == (5, 0.5)
    # A batch cut in half: the rest needs whole batches again.
    odd = plan_run(params, total=6, done=3)
    assert (odd.remaining, odd.seed, odd.n_iter) == (3, 103, 2)
    with pytest.raises(ValueError):
        plan_run(params, total=6, done=6)


def test_fresh_plan_is_one_run_with_the_requested_seed() -> None:
    params = txt2img_params(iterations=4, batchSize=1, seed=42)
    plan = plan_run(params, total=4, done=0)
    assert (plan.seed, plan.n_iter, plan.n_samples) == (42, 4, 1)
    assert [plan.progress(b, 0.25)[0] for b in range(4)] == [1, 2, 3, 4]


def test_progress_ends_on_the_last_image_finished() -> None:
    # The outer bar's last redraw (every batch done) starts no new image: the job is at its
    # last image, complete, not at that image's beginning.
    plan = plan_run(txt2img_params(iterations=2, batchSize=3), total=6, done=0)
    assert plan.progress(1, 0.4) == (4, 0.4)
    assert plan.progress(2, 0.0) == (6, 1.0)
    cut = plan_run(txt2img_params(iterations=3, batchSize=2), total=6, done=3)  # 2 batches, 3 kept
    assert cut.progress(1, 0.5) == (6, 0.5)
    assert cut.progress(2, 0.0) == (6, 1.0)


def test_environment_of_the_scripts() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/home/u", "PYTHONPATH": "/elsewhere", "PYTHONHOME": "/x"}
    env = script_environment(base, Path("/repo"))
    assert env["PYTHONPATH"] == "/repo"
    assert env["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/u"
    assert "PYTHONHOME" not in env
    with_site = script_environment(base, Path("/repo"), Path("/job/run/site"))
    assert with_site["PYTHONPATH"] == "/job/run/site:/repo"


def test_scripts_are_the_forks() -> None:
    assert {name: e.script for name, e in ENDPOINTS.items()} == {
        "text-to-image": "scripts/txt2img.py",
        "image-to-image": "scripts/img2img.py",
        "inpaint-image": "scripts/inpaint.py",
    }
    assert all((SIMULATOR / e.script).is_file() for e in ENDPOINTS.values())


@pytest.mark.parametrize("endpoint", ["text-to-image", "image-to-image"])
def test_sampling_runs_in_the_repository_and_write_numbered_samples(
    endpoint: str, tmp_path: Path
) -> None:
    folders = ENDPOINTS[endpoint].make_run_folders(tmp_path / "run", Path("/repo"), CKPT)
    assert folders.cwd == Path("/repo") and folders.images == folders.outdir / "samples"
    assert folders.images.is_dir()
    for name in ("00001.png", "00000.png", "grid-0000.png", "00002.png.tmp"):
        (folders.images / name).write_bytes(b"")
    assert [p.name for p in ENDPOINTS[endpoint].outputs(folders)] == ["00000.png", "00001.png"]


def test_inpaint_runs_in_a_folder_of_its_own_linking_config_and_checkpoint(
    tmp_path: Path,
) -> None:
    repo, checkpoint = tmp_path / "repo", tmp_path / "chosen.ckpt"
    endpoint = ENDPOINTS["inpaint-image"]
    folders = endpoint.make_run_folders(tmp_path / "run", repo, checkpoint)
    assert folders.cwd == tmp_path / "run" / "cwd" and folders.images == folders.outdir
    assert (folders.cwd / INPAINT_CONFIG).readlink() == repo / INPAINT_CONFIG
    assert (folders.cwd / INPAINT_CHECKPOINT).readlink() == checkpoint
    assert endpoint.outputs(folders) == []
    (folders.images / "image.png").write_bytes(b"")
    (folders.images / "other.png").write_bytes(b"")
    assert endpoint.outputs(folders) == [folders.images / "image.png"]


def test_sitecustomize_seeds_torch_at_interpreter_start(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(sitecustomize_source(1234))
    env = script_environment(os.environ, SIMULATOR, tmp_path)  # the simulator ships a fake torch
    result = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.initial_seed())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "1234"
