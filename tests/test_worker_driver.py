"""The resident worker's driver (sd_rest/worker_driver) on the simulator, started as the server
starts it (tests/workerharness.py): every PNG a job writes in the worker is byte-identical to the
same script run by hand, whatever ran before (other scripts, seeds and sizes, failures,
cancels); what it keeps is really kept; and the control channel does what its docstring says.

The simulator's scripts are built like the real ones (sd_rest/simulator/README.md): their model
build draws from the stand-in torch's generator before the sampler's noise, and the stand-in has
no TorchDispatchMode, so the driver keeps the generator in step by rebuilding (its fallback).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from helpers import SIMULATOR, read_jsonl
from workerharness import (
    DRIVER,
    Finished,
    Worker,
    inpaint_cwd,
    pngs,
    run_by_hand,
    traceback_of,
)

PYTHON = Path(sys.executable)
T2I_CKPT = SIMULATOR / "models" / "demo" / "text-to-image.ckpt"
INPAINT_CKPT = SIMULATOR / "models" / "demo" / "inpaint-image.ckpt"
SCRIPTS = {name: SIMULATOR / "scripts" / f"{name}.py" for name in ("txt2img", "img2img", "inpaint")}
# The worker's knobs: reading a checkpoint and building a model take long enough for a SIGINT
# to land in them; by hand nothing needs to be slow (knobs never change a PNG).
WORKER_KNOBS = {
    "SD_SIM_STEP_SECONDS": "0.005",
    "SD_SIM_LOAD_SECONDS": "0.3",
    "SD_SIM_BUILD_SECONDS": "0.15",
}
BY_HAND_KNOBS = {"SD_SIM_STEP_SECONDS": "0", "SD_SIM_LOAD_SECONDS": "0"}
Ran = subprocess.CompletedProcess[bytes]
LONG_STEPS = 400  # 2 s of sampling at 5 ms a step: a cancel lands mid-sampling


@dataclass(frozen=True)
class Case:
    script: str
    argv: Callable[[Path, Path], list[str]]  # (outdir, inputs) -> argv
    seed: int | None = None  # inpaint's, given by the server instead of a flag


def txt2img(seed: int, steps: int = 4, h: int = 256, w: int = 256, prompt: str = "a red fox",
            n_iter: int = 1, n_samples: int = 1) -> Case:  # fmt: skip
    def argv(outdir: Path, inputs: Path) -> list[str]:
        return [
            f"--prompt={prompt}", f"--outdir={outdir}", f"--ddim_steps={steps}",
            f"--n_iter={n_iter}", f"--n_samples={n_samples}", f"--seed={seed}",
            f"--ckpt={T2I_CKPT}", f"--H={h}", f"--W={w}",
        ]  # fmt: skip

    return Case("txt2img", argv)


def img2img(seed: int, steps: int = 8, strength: float = 0.75, init: str = "init.png") -> Case:
    def argv(outdir: Path, inputs: Path) -> list[str]:
        return [
            "--prompt=a red barn", f"--init-img={inputs / init}", f"--outdir={outdir}",
            f"--ddim_steps={steps}", "--n_samples=1", f"--seed={seed}", f"--ckpt={T2I_CKPT}",
            f"--strength={strength}",
        ]  # fmt: skip

    return Case("img2img", argv)


def inpaint(seed: int, steps: int = 4) -> Case:
    def argv(outdir: Path, inputs: Path) -> list[str]:
        return [f"--indir={inputs / 'inpaint'}", f"--outdir={outdir}", f"--steps={steps}"]

    return Case("inpaint", argv, seed)


CASES = {
    "T42": txt2img(42),
    "T7": txt2img(7),
    "T42-320x256": txt2img(42, h=320, w=256),
    "T1234-6steps": txt2img(1234, steps=6, prompt="an oil painting"),
    "T9-2x2": txt2img(9, n_iter=2, n_samples=2),  # 4 images and a grid
    "I42": img2img(42),
    "I7": img2img(7, strength=0.5),
    "P3": inpaint(3),
    "P5": inpaint(5, steps=5),
}


def plus(case: Case, *flags: str) -> Case:
    return Case(case.script, lambda o, i: [*case.argv(o, i), *flags], case.seed)


# Runs that fail: their traceback and exit status must be the ones of a run by hand.
FAILURES = {
    "fail-missing-init": (img2img(42, init="missing.png"), 1),
    "fail-argparse": (plus(txt2img(42), "--no-such-flag"), 2),
    # raised inside torch.load, which the driver wraps: its frames must not show
    "fail-missing-ckpt": (plus(txt2img(42), "--ckpt=/no/such.ckpt"), 1),
}
SAMPLING = rb"\| +[1-9]\d*/\d+ \["  # a sampler bar past its first step
INTERRUPTS = {  # (case, when to send the SIGINT)
    "int-txt2img": (txt2img(42, steps=LONG_STEPS), SAMPLING),
    "int-img2img": (img2img(7, steps=LONG_STEPS), SAMPLING),
    "int-inpaint": (inpaint(3, steps=LONG_STEPS), SAMPLING),
    # while the checkpoint is read (the model must not be resident then), or the model built;
    # long, so that a SIGINT that comes late still lands in the job
    "int-loading-txt2img": (txt2img(7, steps=LONG_STEPS), rb"Loading model from"),
    "int-building-inpaint": (inpaint(5, steps=LONG_STEPS), rb"Keeping EMAs of"),
}
ORDERS = {
    "A": ["T42", "I42", "T7", "P3", "T42", "fail-missing-init", "int-txt2img", "T7", "I7",
          "int-inpaint", "?check", "P3", "P5", "T42-320x256", "fail-argparse", "I42",
          "fail-missing-ckpt",
          "T1234-6steps", "T9-2x2", "T42"],
    "B": ["P3", "I7", "int-img2img", "P5", "int-loading-txt2img", "T7", "T42",
          "int-building-inpaint", "P3", "fail-missing-init", "I42", "?check", "P5", "P3",
          "T9-2x2"],
}  # fmt: skip


def make_inputs(folder: Path) -> Path:
    """img2img's init image and an inpaint pair, 256×256."""
    (folder / "inpaint").mkdir(parents=True)
    picture = Image.new("RGB", (256, 256), (30, 110, 190))
    ImageDraw.Draw(picture).ellipse((40, 60, 200, 220), fill=(220, 180, 40))
    picture.save(folder / "init.png")
    picture.save(folder / "inpaint" / "a.png")
    mask = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(mask).rectangle((128, 0, 256, 256), fill=255)
    mask.save(folder / "inpaint" / "a_mask.png")
    return folder


class ByHand:
    """Each case run once in a fresh process, as the server runs jobs today."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs = make_inputs(root / "inputs")
        self._done: dict[str, tuple[dict[str, bytes], Ran]] = {}

    def run(self, name: str, case: Case) -> tuple[dict[str, bytes], Ran]:
        if name not in self._done:
            folder = self.root / name
            cwd = cwd_for(case, folder)
            outdir = folder / "out"
            result = run_by_hand(
                PYTHON, SIMULATOR, SCRIPTS[case.script], case.argv(outdir, self.inputs), cwd,
                case.seed, folder, BY_HAND_KNOBS,
            )  # fmt: skip
            self._done[name] = (pngs(outdir), result)
        return self._done[name]


def cwd_for(case: Case, folder: Path) -> Path:
    if case.script == "inpaint":
        return inpaint_cwd(folder / "cwd", SIMULATOR, INPAINT_CKPT)
    return SIMULATOR


@pytest.fixture(scope="module")
def by_hand(tmp_path_factory: pytest.TempPathFactory) -> ByHand:
    return ByHand(tmp_path_factory.mktemp("by-hand"))


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(extra_env: dict[str, str] | None = None, **kwargs: object) -> Worker:
        env = {**WORKER_KNOBS, **(extra_env or {})}
        worker = Worker(PYTHON, SIMULATOR, env, **kwargs).start()  # type: ignore[arg-type]
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


class Jobs:
    """Jobs of one worker, each with its own outdir (and inpaint cwd) as the server gives."""

    def __init__(self, worker: Worker, root: Path, inputs: Path) -> None:
        self.worker, self.root, self.inputs = worker, root, inputs
        self.count = 0

    def run(self, case: Case, interrupt_when: bytes | None = None) -> tuple[Finished, Path]:
        self.count += 1
        folder = self.root / f"job-{self.count}"
        outdir = folder / "out"
        finished = self.worker.run(
            f"job-{self.count}", SCRIPTS[case.script], case.argv(outdir, self.inputs),
            cwd_for(case, folder), case.seed,
            re.compile(interrupt_when) if interrupt_when else None,
        )  # fmt: skip
        return finished, outdir


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_pngs_equal_runs_by_hand_in_any_order(
    order: str, by_hand: ByHand, start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    worker = start_worker()
    jobs = Jobs(worker, tmp_path, by_hand.inputs)
    generators = []
    for step in ORDERS[order]:
        if step == "?check":
            # The resident model holds exactly its checkpoint's weights (EMA swaps undone after
            # the interrupted inpaint), no EMA clones are kept, the cache shares its tensors.
            assert worker.check()["ok"], (step, worker.status())
        elif step in CASES:
            finished, outdir = jobs.run(CASES[step])
            expected, result = by_hand.run(step, CASES[step])
            assert result.returncode == 0, result.stderr.decode()
            assert (finished["outcome"], finished["exit_code"]) == ("ok", 0), finished.text
            assert expected, step
            assert pngs(outdir) == expected, (order, step, finished["cache"])
            generators.append(finished["cache"]["generator"])
        elif step in FAILURES:
            case, code = FAILURES[step]
            finished, outdir = jobs.run(case)
            _, result = by_hand.run(step, case)
            assert (result.returncode, finished["exit_code"]) == (code, code), finished.text
            assert finished["outcome"] == "error" and not pngs(outdir)
            stderr = result.stderr.decode()
            if code == 1:
                assert traceback_of(finished.text) == traceback_of(stderr) != ""
            assert finished.text.strip().splitlines()[-1] == stderr.strip().splitlines()[-1]
        else:
            case, when = INTERRUPTS[step]
            finished, _ = jobs.run(case, interrupt_when=when)
            assert finished["outcome"] == "interrupted", (step, finished.event, finished.text)
            assert finished["exit_code"] == -2 and "KeyboardInterrupt" in finished.text
            # Idle again within a second of the SIGINT (the server kills it otherwise).
            assert finished.cancel_latency is not None and finished.cancel_latency < 1.0
            assert worker.status()["busy"] is False
    # The order went through every way of reusing a model on the simulator.
    assert {None, "rebuild", "same-seed"} <= set(generators), generators


def test_the_second_job_of_a_config_is_a_model_hit_and_faster(
    start_worker: Callable[..., Worker], by_hand: ByHand, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    worker = start_worker({
        "SD_SIM_IMPORT_SECONDS": "0.3", "SD_SIM_SAFETY_SECONDS": "0.3",
        "SD_SIM_LOAD_SECONDS": "0.6", "SD_SIM_EVENT_LOG": str(events),
    })  # fmt: skip
    jobs = Jobs(worker, tmp_path, by_hand.inputs)
    ran = {}
    for name in ("T42", "T7", "T1234-6steps", "P3", "T42"):
        finished, outdir = jobs.run(CASES[name])
        assert pngs(outdir) == by_hand.run(name, CASES[name])[0], name
        ran.setdefault(name, []).append(finished)
    first, second = ran["T42"][0], ran["T7"][0]
    assert first["cache"] == {
        "model": "built", "generator": None, "checkpoint": "read", "evicted": False
    }  # fmt: skip
    assert second["cache"] == {
        "model": "hit", "generator": "rebuild", "checkpoint": "hit", "evicted": False
    }  # fmt: skip
    assert ran["T1234-6steps"][0]["cache"]["model"] == "hit"
    # inpaint has its own model: the txt2img one goes, and comes back read and built anew.
    assert ran["P3"][0]["cache"]["evicted"] is True
    assert ran["T42"][1]["cache"] == {
        "model": "built", "generator": None, "checkpoint": "read", "evicted": True
    }  # fmt: skip
    # The first job paid imports, the safety checker and the checkpoint (>= 1.2 s of sleeps);
    # the second none of them.
    assert first["seconds"] >= 1.2
    assert second["seconds"] < first["seconds"]
    mine = [e for e in read_jsonl(events) if e["pid"] == worker.pid]
    kinds = [e["event"] for e in mine if e["event"] not in ("step", "image")]
    # Imports and the module-level safety checker once for all three txt2img jobs; each
    # checkpoint read once per model; the model built once per model, plus a rebuild (the
    # dropped one that keeps the generator in step) per hit on another seed.
    assert kinds.count("import") == 1
    assert [e["kind"] for e in mine if e["event"] == "pretrained"] == [
        "AutoFeatureExtractor", "StableDiffusionSafetyChecker"
    ]  # fmt: skip
    assert [Path(e["path"]).name for e in mine if e["event"] == "checkpoint"] == [
        "text-to-image.ckpt", "last.ckpt", "text-to-image.ckpt"  # last.ckpt: inpaint's link
    ]  # fmt: skip
    assert kinds.count("build") == 5  # T42, T7 (rebuild), T1234 (rebuild), P3, T42


def test_without_generator_parity_a_reused_model_paints_other_pictures(
    start_worker: Callable[..., Worker], by_hand: ByHand, tmp_path: Path
) -> None:
    """SD_REST_WORKER_GENERATOR=off reuses the model without moving the generator as its build
    would: the sampler's noise then starts where the build's draws would have, and the bytes
    differ. With parity (the default), the same jobs are identical."""
    results = {}
    for parity in ("on", "off"):
        env = {"SD_REST_WORKER_GENERATOR": "off"} if parity == "off" else {}
        jobs = Jobs(start_worker(env), tmp_path / parity, by_hand.inputs)
        for name in ("T42", "T7", "P3", "P5"):
            finished, outdir = jobs.run(CASES[name])
            results[parity, name] = (finished["cache"]["generator"], pngs(outdir))
    for name in ("T42", "T7", "P3", "P5"):
        assert results["on", name][1] == by_hand.run(name, CASES[name])[0], name
    assert results["on", "T7"][0] == results["on", "P5"][0] == "rebuild"
    # Freshly built: the same either way. Reused for another seed: other pictures.
    assert results["off", "T42"] == results["on", "T42"]
    assert results["off", "P3"] == results["on", "P3"]
    for name in ("T7", "P5"):
        generator, made = results["off", name]
        assert generator == "off"
        assert made.keys() == results["on", name][1].keys()
        assert made != results["on", name][1], name


def test_status_is_answered_while_busy_and_reports_the_fallback(
    start_worker: Callable[..., Worker], by_hand: ByHand, tmp_path: Path
) -> None:
    worker = start_worker()
    jobs = Jobs(worker, tmp_path, by_hand.inputs)
    jobs.run(CASES["T42"])
    case = INTERRUPTS["int-txt2img"][0]
    start = len(worker.output)
    worker.send({
        "op": "run", "job": "long", "script": str(SCRIPTS["txt2img"]),
        "argv": case.argv(tmp_path / "long", by_hand.inputs), "cwd": str(SIMULATOR),
        "seed": None, "marker": None,
    })  # fmt: skip
    worker.wait_output(re.compile(SAMPLING), start)
    status = worker.status()
    assert (status["busy"], status["job"], status["jobs"]) == (True, "long", 1)
    assert status["pid"] == worker.pid and status["rss"] > 0
    (model,) = status["models"]
    assert model["checkpoint"] == str(T2I_CKPT.resolve())
    # No TorchDispatchMode in the stand-in torch: the documented fallback, and why.
    assert model["generator"] == "rebuild"
    assert model["generator_reasons"] == ["no TorchDispatchMode"]
    worker.send({"op": "prepare", "seed": 7})  # only a hint: nothing to prepare on rebuild
    worker.send({"op": "status"})
    assert worker.wait_event(lambda e: e["event"] == "status")["busy"] is True
    worker.send({"op": "nonsense"})
    assert "nonsense" in worker.wait_event(lambda e: e["event"] == "error")["error"]
    finished = worker.wait_event(lambda e: e["event"] == "finished", 60)
    assert finished["outcome"] == "ok" and finished["cache"]["generator"] == "same-seed"
    assert worker.status()["busy"] is False


def test_sigint_while_idle_is_ignored(
    start_worker: Callable[..., Worker], by_hand: ByHand, tmp_path: Path
) -> None:
    worker = start_worker()
    os.killpg(worker.pid, signal.SIGINT)
    time.sleep(0.2)
    assert worker.status()["busy"] is False
    finished, outdir = Jobs(worker, tmp_path, by_hand.inputs).run(CASES["T7"])
    assert finished["outcome"] == "ok"
    assert pngs(outdir) == by_hand.run("T7", CASES["T7"])[0]


def test_socket_eof_ends_the_worker_at_once_even_mid_job(
    start_worker: Callable[..., Worker], by_hand: ByHand, tmp_path: Path
) -> None:
    worker = start_worker()
    case = INTERRUPTS["int-txt2img"][0]
    start = len(worker.output)
    worker.send({
        "op": "run", "job": "long", "script": str(SCRIPTS["txt2img"]),
        "argv": case.argv(tmp_path / "long", by_hand.inputs), "cwd": str(SIMULATOR),
    })  # fmt: skip
    worker.wait_output(re.compile(SAMPLING), start)
    worker.drop()  # what the kernel does to a killed server's end
    assert worker.wait_exit(5) == 0


def test_ready_carries_the_token_and_the_scripts_do_not_see_the_worker_variables(
    start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    worker = start_worker()
    assert worker.ready["token"] == worker.token and len(worker.token) == 32
    assert worker.ready["pid"] == worker.pid and worker.ready["driver"]
    script = tmp_path / "environment.py"
    script.write_text(
        "import json, os, sys\n"
        "json.dump({'environ': dict(os.environ), 'path0': sys.path[0], 'argv': sys.argv},"
        " open(sys.argv[1], 'w'))\n"
    )
    seen = tmp_path / "seen.json"
    finished = worker.run("env", script, [str(seen)], tmp_path)
    assert finished["exit_code"] == 0
    found = json.loads(seen.read_text())
    assert not [name for name in found["environ"] if name.startswith("SD_REST_WORKER_")]
    assert found["environ"]["PYTHONPATH"] == str(SIMULATOR)
    assert found["path0"] == str(tmp_path)  # the script's folder, as `python script.py` has
    assert found["argv"] == [str(script), str(seen)]


def test_a_worker_whose_token_is_refused_exits(start_worker: Callable[..., Worker]) -> None:
    worker = start_worker(expected_token="0" * 32)  # the server drops the connection
    assert worker.wait_exit(5) == 0


def test_without_its_socket_the_driver_exits_with_status_2(tmp_path: Path) -> None:
    for env in ({}, {"SD_REST_WORKER_SOCKET": str(tmp_path / "nobody-listens.sock")}):
        result = subprocess.run(
            [sys.executable, str(DRIVER)], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("worker_driver: ")


def test_exit_and_a_failure_of_the_driver_itself(start_worker: Callable[..., Worker]) -> None:
    worker = start_worker()
    worker.send({"op": "exit"})
    assert worker.wait_exit(5) == 0
    worker = start_worker()
    worker.send({"op": "run", "job": "broken"})  # no script: a bug of the server's, say
    fatal = worker.wait_event(lambda e: e["event"] == "fatal")
    assert fatal["job"] == "broken" and "script" in fatal["error"]
    assert worker.wait_exit(5) == 70


@pytest.mark.parametrize(
    ("source", "exit_code", "oom", "recycle"),
    [
        ("raise RuntimeError('CUDA out of memory. Tried to allocate 2 GiB')", 1, True,
         "out of memory"),
        ("raise MemoryError()", 1, True, "out of memory"),
        ("import broken_module_for_the_test", 1, False, None),  # nothing left half imported
        ("import half_imported_package", 1, False, "failed during an import"),
        ("raise ValueError('just a bug')", 1, False, None),
        ("import sys; sys.exit(3)", 3, False, None),
        ("import sys; sys.exit('a message')", 1, False, None),
    ],
)  # fmt: skip
def test_how_a_script_ends_is_reported_as_by_hand(
    start_worker: Callable[..., Worker],
    tmp_path: Path,
    source: str,
    exit_code: int,
    oom: bool,
    recycle: str | None,
) -> None:
    (tmp_path / "broken_module_for_the_test.py").write_text("raise ImportError('broken')\n")
    package = tmp_path / "half_imported_package"
    package.mkdir()
    (package / "__init__.py").write_text("from . import done\nraise ImportError('half done')\n")
    (package / "done.py").write_text("")
    script = tmp_path / "ends.py"
    script.write_text(f"print('started')\n{source}\n")
    finished = start_worker().run("ends", script, [], tmp_path)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True)
    assert finished["exit_code"] == result.returncode == exit_code
    assert (finished["oom"], finished["recycle"]) == (oom, recycle)
    assert finished.text.startswith("started\n")
    stderr = result.stderr.decode()
    assert traceback_of(finished.text) == traceback_of(stderr)
    last_line = stderr.rstrip().splitlines()[-1] if stderr.strip() else "started"
    assert finished.text.rstrip().splitlines()[-1] == last_line


def test_a_missing_script_fails_as_python_does(
    start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    worker = start_worker()
    finished = worker.run("missing", tmp_path / "nope.py", [], tmp_path)
    assert (finished["outcome"], finished["exit_code"], finished["cache"]) == ("error", 2, None)
    assert "can't open file" in finished.text
    assert worker.status()["busy"] is False


def test_a_huge_error_is_capped_in_finished_and_whole_in_the_output(
    start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """The server reads lines of 1 MiB at most: an error in "finished" is cut to 2,000
    characters; the traceback in the output (the job's log) is whole."""
    script = tmp_path / "huge.py"
    script.write_text('raise ValueError("a huge message: " + "x" * 200_000)\n')
    finished = start_worker().run("huge", script, [], tmp_path)
    assert (finished["outcome"], finished["exit_code"]) == ("error", 1)
    error = finished["error"]
    assert error.startswith("ValueError: a huge message: xxx") and len(error) < 2100, len(error)
    assert error.endswith("more characters in the job's log]")
    assert "x" * 200_000 in finished.text


# Once the job has ended, a thread of its grows the worker by 256 MiB (kept) and says so.
GROWS_AFTER_THE_JOB = """\
import builtins, sys, threading, time
def grow(done):
    time.sleep(0.3)
    builtins.sd_rest_test_ballast = b"\\x01" * (256 << 20)
    open(done, "w").close()
threading.Thread(target=grow, args=(sys.argv[1],), daemon=True).start()
"""


def test_heartbeats_reuse_the_rss_measured_after_each_job_for_a_minute(
    start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """Measuring RSS costs a `ps` on macOS: a heartbeat sends the figure measured after the
    last job, measuring again only once it is a minute old; heartbeats keep their pace."""
    worker = start_worker({"SD_REST_WORKER_HEARTBEAT": "0.1"})
    grows, grown, idle = tmp_path / "grows.py", tmp_path / "grown", tmp_path / "idle.py"
    grows.write_text(GROWS_AFTER_THE_JOB)
    idle.write_text("")
    assert worker.run("grows", grows, [str(grown)], tmp_path)["outcome"] == "ok"
    deadline = time.monotonic() + 10
    while not grown.exists():
        assert time.monotonic() < deadline, "the script's thread never grew the worker"
        time.sleep(0.01)
    grown_rss = worker.status()["rss"]  # asked for: measured now
    began = time.monotonic()
    beats = []
    while time.monotonic() - began < 6:  # past the 5 s a figure was kept before
        beats.append(worker.wait_event(lambda e: e["event"] == "heartbeat", 5))
    assert len(beats) >= 30  # still every 0.1 s
    assert all(beat["rss"] < grown_rss - (128 << 20) for beat in beats), grown_rss
    assert worker.run("idle", idle, [], tmp_path)["outcome"] == "ok"
    # Measured again right after that job (a beat sent just before may have the old figure).
    worker.wait_event(lambda e: e["event"] == "heartbeat" and e["rss"] > grown_rss - (64 << 20), 2)


def test_a_status_that_cannot_be_read_after_a_good_job_keeps_the_worker(
    start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """The status sent after a job is not part of it: one that cannot be read (the script broke
    what measuring RSS uses, here) used to be taken for a failure of the driver (exit 70)."""
    breaks, mends = tmp_path / "breaks.py", tmp_path / "mends.py"
    breaks.write_text(
        "import builtins, os\nbuiltins.sd_rest_test_sysconf = os.sysconf\n"
        "os.sysconf = lambda name: 1 / 0\n"
    )
    mends.write_text("import builtins, os\nos.sysconf = builtins.sd_rest_test_sysconf\n")
    worker = start_worker()
    assert worker.run("breaks", breaks, [], tmp_path)["outcome"] == "ok"
    assert worker.run("mends", mends, [], tmp_path)["outcome"] == "ok"
    status = worker.status()
    assert (status["jobs"], status["rss"] > 0) == (2, True)


def test_a_cancel_during_the_seeds_import_of_torch_interrupts_the_run(
    start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """A seeded run imports torch before the script, as a sitecustomize does for a run by hand;
    an interrupt that comes during that import ends the run (it used to be ignored until the
    server killed the worker a second later)."""
    (tmp_path / "torch.py").write_text(
        "import time\nprint('importing torch', flush=True)\ntime.sleep(5)\n"
    )  # found first: the script's folder leads sys.path
    script = tmp_path / "seeded.py"
    script.write_text("print('the script ran')\n")
    worker = start_worker()
    finished = worker.run(
        "seeded", script, [], tmp_path, 3, interrupt_when=re.compile(rb"importing torch")
    )
    assert finished["outcome"] == "interrupted" and "the script ran" not in finished.text
    assert finished.cancel_latency is not None and finished.cancel_latency < 1.0
    assert finished["recycle"] == "interrupted during an import"  # torch is half imported


OLDEST_PYTHON = Path("/root/.pyenv/versions/3.8.18/bin/python")


@pytest.mark.skipif(not OLDEST_PYTHON.exists(), reason="no Python 3.8 interpreter here")
def test_the_driver_runs_on_python_3_8(tmp_path: Path) -> None:
    """The fork's interpreter may be as old as 3.8: the driver must start and run scripts."""
    script = tmp_path / "hello.py"
    script.write_text(
        "import sys\nprint('hello', sys.version_info[:2])\n"
        "open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))\n"
        "if sys.argv[2] == 'fail':\n    raise KeyError(sys.argv[3])\n"
    )
    worker = Worker(OLDEST_PYTHON, tmp_path).start()
    try:
        assert worker.ready["python"].startswith("3.8.")
        finished = worker.run("ok", script, [str(tmp_path / "a"), "x", "y"], tmp_path)
        assert finished["exit_code"] == 0 and (tmp_path / "a").read_text() == "x y"
        assert "hello (3, 8)" in finished.text
        finished = worker.run("fail", script, [str(tmp_path / "b"), "fail", "z"], tmp_path)
        result = subprocess.run(
            [str(OLDEST_PYTHON), str(script), str(tmp_path / "c"), "fail", "z"],
            cwd=tmp_path, capture_output=True,
        )  # fmt: skip
        assert finished["exit_code"] == result.returncode == 1
        assert traceback_of(finished.text) == traceback_of(result.stderr.decode()) != ""
        assert worker.status()["jobs"] == 2
    finally:
        worker.close()
