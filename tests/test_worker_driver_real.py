"""The resident worker's driver on the real fork's unmodified scripts (tiny models, CPU): each
endpoint's PNGs as the script wrote them in the worker, in two orders with a failure and
cancels, byte-identical to the same script run by hand; the generator kept in step by the
Mersenne-Twister jump on reused models. Needs the kit (tests/realfork.py); a run by hand costs
~7 s of imports, a resident job ~1 s a sampler step."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from realfork import RealFork
from workerharness import Finished, Worker, inpaint_cwd, pngs, run_by_hand, traceback_of

pytestmark = pytest.mark.real_fork

# The kit's inpaint checkpoint has EMA weights equal to its weights, so an EMA swap left in a
# cached model would change no PNG: this copy's EMA weights differ (made with the kit's torch).
PERTURB_EMA = """
import sys, torch
checkpoint = torch.load(sys.argv[1], map_location="cpu")
noise = torch.Generator().manual_seed(0)
for name, value in checkpoint["state_dict"].items():
    if name.startswith("model_ema.") and value.is_floating_point() and value.dim():
        checkpoint["state_dict"][name] = value + torch.randn(value.shape, generator=noise) * 0.05
torch.save(checkpoint, sys.argv[2])
"""


@dataclass(frozen=True)
class Case:
    script: str
    argv: Callable[[RealFork, Path], list[str]]  # (kit, outdir) -> argv, as the server gives
    seed: int | None = None  # inpaint's


def sampling(seed: int, steps: int, *own: str) -> Callable[[RealFork, Path], list[str]]:
    def argv(kit: RealFork, outdir: Path) -> list[str]:
        return [
            "--prompt=a red fox", f"--outdir={outdir}", "--skip_grid", f"--ddim_steps={steps}",
            "--ddim_eta=0.0", "--n_iter=1", "--n_samples=1", "--scale=7.5", f"--seed={seed}",
            f"--ckpt={kit.text_to_image_model}",
            *(flag.format(inputs=kit.test_inputs) for flag in own),
        ]  # fmt: skip

    return argv


def txt2img(seed: int, steps: int = 4) -> Case:
    return Case("txt2img", sampling(seed, steps, "--H=256", "--W=256"))


def img2img(seed: int, steps: int = 4, init: str = "init.png") -> Case:
    init_flag = f"--init-img={{inputs}}/{init}"
    return Case("img2img", sampling(seed, steps, init_flag, "--strength=0.75"))


def inpaint(seed: int, steps: int = 4) -> Case:
    def argv(kit: RealFork, outdir: Path) -> list[str]:
        return [f"--indir={kit.test_inputs / 'inpaint'}", f"--outdir={outdir}", f"--steps={steps}"]

    return Case("inpaint", argv, seed)


CASES = {
    "T42": txt2img(42),
    "T7": txt2img(7),
    "I42": img2img(42),
    "P3": inpaint(3),
    "P5": inpaint(5, steps=5),
}
FAIL_MISSING_INIT = img2img(42, init="missing.png")  # raises after the model is loaded
SAMPLING = rb"\| +[1-9]\d*/40 \["  # a 40-step sampler bar past its first step
INTERRUPTS = {  # (case, when to send the SIGINT)
    "int-txt2img": (txt2img(42, steps=40), SAMPLING),
    "int-img2img": (img2img(7, steps=54), SAMPLING),  # 0.75 x 54: 40 decoding steps
    "int-inpaint": (inpaint(3, steps=40), SAMPLING),
    # while the checkpoint is read or the model built (the txt2img model is not resident then)
    "early-txt2img": (txt2img(7), rb"Loading model from"),
    "early-inpaint": (inpaint(5), rb"Found 1 inputs"),
}
ORDERS = {
    "A": ["T42", "I42", "T7", "P3", "fail-missing-init", "int-txt2img", "T7", "int-inpaint",
          "?check", "P5", "T42"],
    "B": ["P3", "T7", "int-img2img", "I42", "P5", "early-txt2img", "T42", "early-inpaint",
          "P3"],
}  # fmt: skip


class Kit:
    def __init__(self, fork: RealFork, root: Path) -> None:
        self.fork, self.root = fork, root
        self.inpaint_checkpoint = root / "inpaint-ema-differs.ckpt"
        subprocess.run(
            [str(fork.python), "-c", PERTURB_EMA, str(fork.inpaint_image_model),
             str(self.inpaint_checkpoint)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        self._by_hand: dict[str, tuple[dict[str, bytes], subprocess.CompletedProcess[bytes]]] = {}

    def script(self, case: Case) -> Path:
        return self.fork.repository / "scripts" / f"{case.script}.py"

    def cwd(self, case: Case, folder: Path) -> Path:
        if case.script == "inpaint":
            return inpaint_cwd(folder / "cwd", self.fork.repository, self.inpaint_checkpoint)
        return self.fork.repository

    def by_hand(self, name: str, case: Case) -> tuple[dict[str, bytes], str, int]:
        if name not in self._by_hand:
            folder = self.root / "by-hand" / name
            outdir = folder / "out"
            result = run_by_hand(
                self.fork.python, self.fork.repository, self.script(case),
                case.argv(self.fork, outdir), self.cwd(case, folder), case.seed, folder,
            )  # fmt: skip
            self._by_hand[name] = (pngs(outdir), result)
        made, result = self._by_hand[name]
        return made, result.stderr.decode(errors="replace"), result.returncode


@pytest.fixture(scope="module")
def kit(real_fork: RealFork, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return Kit(real_fork, tmp_path_factory.mktemp("worker-real"))


def run(
    worker: Worker, kit: Kit, job: str, case: Case, interrupt_when: bytes | None = None
) -> tuple[Finished, Path]:
    folder = kit.root / f"{worker.pid}-{job}"
    outdir = folder / "out"
    finished = worker.run(
        job, kit.script(case), case.argv(kit.fork, outdir), kit.cwd(case, folder), case.seed,
        re.compile(interrupt_when) if interrupt_when else None, timeout=300,
    )  # fmt: skip
    return finished, outdir


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_resident_pngs_equal_runs_by_hand(kit: Kit, order: str) -> None:
    worker = Worker(kit.fork.python, kit.fork.repository).start(ready_timeout=120)
    try:
        methods = []
        for i, step in enumerate(ORDERS[order]):
            job = f"{order}{i}-{step}"
            if step == "?check":
                # After the interrupted inpaint: the weights are the checkpoint's (the EMA swap
                # undone), no EMA clones kept, the cached checkpoint aliased to the model.
                check = worker.check()
                assert check["ok"], check
            elif step in CASES:
                finished, outdir = run(worker, kit, job, CASES[step])
                assert finished["outcome"] == "ok", finished.text[-3000:]
                made, stderr, code = kit.by_hand(step, CASES[step])
                assert code == 0 and made, stderr[-3000:]
                assert pngs(outdir) == made, (job, finished["cache"])
                methods.append((step, finished["cache"]["model"], finished["cache"]["generator"]))
            elif step == "fail-missing-init":
                finished, outdir = run(worker, kit, job, FAIL_MISSING_INIT)
                _, stderr, code = kit.by_hand(step, FAIL_MISSING_INIT)
                assert finished["exit_code"] == code == 1 and not pngs(outdir)
                assert traceback_of(finished.text) == traceback_of(stderr) != ""
            elif step.startswith("early-"):
                # Libraries may turn the KeyboardInterrupt into their own error (the server
                # knows it cancelled); what matters is the jobs after it.
                finished, _ = run(worker, kit, job, *INTERRUPTS[step])
                assert finished["outcome"] in ("interrupted", "error"), finished.text[-3000:]
                assert finished.cancel_latency is not None and finished.cancel_latency < 5
            else:
                finished, _ = run(worker, kit, job, *INTERRUPTS[step])
                assert finished["outcome"] == "interrupted", finished.text[-3000:]
                assert finished["recycle"] is None
                # Promptly: a single torch op can delay the interrupt, and the cores are shared.
                assert finished.cancel_latency is not None and finished.cancel_latency < 5
                assert worker.status()["busy"] is False
        # A reused model for another seed: the generator jumped, never rebuilt.
        reused = [generator for _, model, generator in methods if model == "hit"]
        assert "jump" in reused and "rebuild" not in reused, methods
        (model,) = worker.status()["models"]
        assert model["generator"] == "jump" and model["generator_words"] > 0
    finally:
        worker.close()
