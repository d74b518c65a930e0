"""Resident workers against one process per job, on the real fork's code (the kit of tiny models
that runs the unmodified scripts on a CPU), side by side in one run.

Ten one-image txt2img jobs (256×256, 8 steps, a new seed each) through a server with
`--runner process`, then the same ten through a server with `--runner resident`: the wall time of
each set (first POST to last COMPLETE; the resident server's worker has warmed up first: it
loads the model when the server starts), and, before them, the first resident job against the
second at the warm-up's size (warm start: the first pays nothing the second does not). Then more
jobs on the resident server: the worker's RSS after 5 and after 50 jobs, and the longest it went
without a heartbeat over all of them (what `--worker-timeout` must leave room for). And what a
job that reuses the model needs to keep the generator in step: the worker's jump-ahead by the
build's draws, timed and its peak memory traced on the fork's interpreter, for the kit's model
and for the draws of the full-size SD v1, against the weights.
(A job's whole peak RSS was tried first: it moves by ±10–30 MiB from job to job on the tiny
model, far above what the jump needs.)

Needs the kit: `SD_REST_REAL_FORK` names the folder with its prepare.sh (as for the tests'
real_fork group), `SD_REST_REAL_FORK_CACHE` where it is built (default
~/.cache/sd-rest/real-fork). Without it the measure says so and is skipped.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import forkkit
from .common import Client, Result, ServerProcess, Sizes, rss_bytes

TERMINAL = frozenset({"COMPLETE", "FAILED", "CANCELED"})
WALL_TARGET = 0.2
FIRST_TARGET = 1.2
WARM_TIMEOUT = 600.0
RSS_TARGET = 1.1
MIB = 1024 * 1024
KIB = 1024


def kit() -> dict[str, Path] | None:
    source = forkkit.kit_folder()
    if source is None:
        return None
    root = forkkit.cache_folder()
    repository = forkkit.build(source, root)
    return {
        "repository": repository,
        "python": repository / "venv" / "bin" / "python",
        "text": root / "models" / "text-to-image.ckpt",
        "inpaint": root / "models" / "inpaint-image.ckpt",
    }


def server(
    workdir: Path, cert: tuple[Path, Path], paths: dict[str, Path], runner: str
) -> ServerProcess:
    args = [
        "--repository", str(paths["repository"]),
        "--python", str(paths["python"]),
        "--text-to-image-model", str(paths["text"]),
        "--inpaint-image-model", str(paths["inpaint"]),
        "--runner", runner,
        "--min-free-space", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_SIM_")}
    return ServerProcess(workdir / runner / "output", cert, env, args=args, demo=False)


def job(n: int, seed: int | None = None) -> dict[str, Any]:
    return {
        "prompt": f"a lighthouse {n}",
        "seed": 1000 + n if seed is None else seed,
        "steps": 8,
        "width": 256,
        "height": 256,
    }


def run_jobs(
    client: Client, numbers: Iterable[int], seed: int | None = None, **changes: Any
) -> tuple[float, list[float]]:
    """Submit the jobs one after another, each once the previous is done: (wall seconds, each
    job's seconds from POST to COMPLETE)."""
    began = time.perf_counter()
    each = []
    for n in numbers:
        start = time.perf_counter()
        url = client.submit({**job(n, seed), **changes})
        doc = client.wait_status(url, TERMINAL, timeout=600)
        if doc["status"] != "COMPLETE":
            raise RuntimeError(f"job {n} ended {doc}")
        each.append(time.perf_counter() - start)
    return time.perf_counter() - began, each


def worker(client: Client) -> dict[str, Any]:
    (only,) = client.get_json("/")["workers"]
    return dict(only)


def wait_warm(client: Client) -> float:
    """Seconds until the server's first worker has warmed up (it is listed idle)."""
    began = time.perf_counter()
    while time.perf_counter() - began < WARM_TIMEOUT:
        if [w for w in client.get_json("/")["workers"] if w["state"] == "idle"]:
            return time.perf_counter() - began
        time.sleep(0.1)
    raise RuntimeError(f"no warm worker after {WARM_TIMEOUT:.0f} s")


JUMP_PROBE = r"""
import importlib.util, json, sys, time, tracemalloc
import numpy as np, torch
spec = importlib.util.spec_from_file_location("mtjump", sys.argv[1])
mtjump = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mtjump)
words = int(sys.argv[2])
torch.manual_seed(1)
mtjump.MT_JUMP.advance(np, torch.get_rng_state().numpy().tobytes(), words)  # once per worker
seconds, peaks = [], []
for seed in range(2, 7):
    torch.manual_seed(seed)
    state = torch.get_rng_state().numpy().tobytes()
    began = time.perf_counter()
    mtjump.MT_JUMP.advance(np, state, words)
    seconds.append(time.perf_counter() - began)
    tracemalloc.start()
    mtjump.MT_JUMP.advance(np, state, words)
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
print(json.dumps({"seconds": sorted(seconds)[2], "peak": max(peaks)}))
"""
# The full-size SD v1 build's draws from the generator: about one 32-bit word per parameter
# of its UNet (859.3 M) and its VAE (83.6 M), both initialised at random before the checkpoint
# is loaded over them.
FULL_SIZE_WORDS = 942_934_827


def jump_cost(python: Path, words: int) -> dict[str, float]:
    """What keeping the generator in step costs a job that reuses a model built with `words`
    draws: the worker's jump-ahead (sd_rest/worker_driver/mtjump.py), run on the fork's
    interpreter with its numpy and torch: seconds (median of 5) and peak memory (tracemalloc,
    which numpy's arrays report to), after the once-per-worker set-up."""
    mtjump = Path(__file__).resolve().parent.parent / "sd_rest" / "worker_driver" / "mtjump.py"
    out = subprocess.run(
        [str(python), "-c", JUMP_PROBE, str(mtjump), str(words)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    paths = kit()
    name = "resident worker vs a process per job (real fork, tiny models)"
    if paths is None:
        return [Result(name, "skipped: set SD_REST_REAL_FORK to the real fork's kit")]
    jobs, more = max(sizes.resident_jobs, 2), sizes.resident_more  # a first and a second
    with server(workdir, cert, paths, "process").start(timeout=120) as process_server:
        process_wall, process_each = run_jobs(Client(process_server.port), range(jobs))
    with server(workdir, cert, paths, "resident").start(timeout=120) as resident_server:
        client = Client(resident_server.port)
        warm_up = wait_warm(client)
        # At the warm-up's size (the default): on a CPU, a new size's first run pays for its
        # shapes (the same job at 256×256 took 2.24 s first, 0.69 s second).
        _, first_two = run_jobs(client, (100, 101), width=512, height=512, steps=2)
        resident_wall, resident_each = run_jobs(client, range(jobs))
        info = worker(client)
        pid = int(info["pid"])
        run_jobs(client, range(jobs, max(jobs, 5)))
        rss_5 = rss_bytes(pid)
        done = max(jobs, 5)
        run_jobs(client, range(done, done + more))
        rss_50 = rss_bytes(pid)
        info = worker(client)
    models = info.get("models") or []
    weights = sum(int(m.get("params") or 0) for m in models) * 4  # float32
    generator = ", ".join(str(m.get("generator")) for m in models) or "?"
    median_process = statistics.median(process_each)
    wall_ratio = resident_wall / process_wall
    first_ratio = first_two[0] / first_two[1]
    silence = float(info.get("longest_silence") or 0.0)
    rss_ratio = rss_50 / rss_5
    words = sum(int(m.get("params") or 0) for m in models)  # one draw a parameter
    tiny = jump_cost(paths["python"], words)
    full = jump_cost(paths["python"], FULL_SIZE_WORDS)
    served = int(info.get("jobs") or 0)
    return [
        Result(
            f"{jobs} one-image txt2img jobs: resident / process wall time",
            f"{resident_wall:.1f} s / {process_wall:.1f} s = {wall_ratio:.3f}×",
            f"≤ {WALL_TARGET}×",
            wall_ratio <= WALL_TARGET,
            note=f"a process job {median_process:.2f} s (median), a resident job after the "
            f"first {statistics.median(resident_each[1:] or resident_each):.2f} s (median)",
        ),
        Result(
            "first resident job / the second (warm start; 512×512, 2 steps)",
            f"{first_two[0]:.2f} s / {first_two[1]:.2f} s = {first_ratio:.2f}×",
            f"≤ {FIRST_TARGET}×",
            first_ratio <= FIRST_TARGET,
            note=f"the worker was warm {warm_up:.1f} s after the server answered; then the "
            f"first 256×256 job took {resident_each[0]:.2f} s, the second "
            f"{resident_each[1]:.2f} s",
        ),
        Result(
            f"longest heartbeat silence of the worker over {served} jobs",
            f"{silence:.1f} s",
            "",
            None,
            note="heartbeats every 2 s; --worker-timeout defaults to 120 s",
        ),
        Result(
            f"worker RSS after {served} jobs / after 5",
            f"{rss_50 / MIB:.1f} MiB / {rss_5 / MIB:.1f} MiB = {rss_ratio:.3f}×",
            f"≤ {RSS_TARGET}×",
            rss_ratio <= RSS_TARGET,
        ),
        Result(
            "memory a job needs to keep the generator in step",
            f"{tiny['peak'] / KIB:.0f} KiB = {tiny['peak'] / weights:.2%} of the model's "
            f"{weights / MIB:.1f} MiB of weights"
            if weights
            else f"{tiny['peak'] / KIB:.0f} KiB (weights unknown)",
            "",
            None,
            note=f"kept in step by: {generator}; the jump-ahead by the model's draws (about "
            f"{words:,} words, one a parameter) takes {tiny['seconds'] * 1000:.1f} ms; for the "
            "full-size SD v1 "
            f"(UNet and VAE, {FULL_SIZE_WORDS:,} words) {full['seconds'] * 1000:.1f} ms and "
            f"{full['peak'] / KIB:.0f} KiB = {full['peak'] / (FULL_SIZE_WORDS * 4):.4%} of its "
            f"{FULL_SIZE_WORDS * 4 / 1e9:.2f} GB of weights (measured on the fork's interpreter, "
            "peak by tracemalloc)",
        ),
    ]
