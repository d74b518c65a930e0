"""Resident workers against one process per job, on the real fork's code (the kit of tiny models
that runs the unmodified scripts on a CPU), side by side in one run.

Ten one-image txt2img jobs (256×256, 8 steps, a new seed each) through a server with
`--runner process`, then the same ten through a server with `--runner resident`: the wall time of
each set (first POST to last COMPLETE), and the first resident job (it pays the imports and the
first build) against a process job. Then more jobs on the resident server: the worker's RSS after
5 and after 50 jobs. And the memory a job needs to keep the generator in step: the worker's peak
RSS during a job that reuses the model, above its RSS before it, against the model's weights.

Needs the kit: `SD_REST_REAL_FORK` names the folder with its prepare.sh (as for the tests'
real_fork group), `SD_REST_REAL_FORK_CACHE` where it is built (default
~/.cache/sd-rest/real-fork). Without it the measure says so and is skipped.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from . import forkkit
from .common import Client, Result, ServerProcess, Sizes, rss_bytes

TERMINAL = frozenset({"COMPLETE", "FAILED", "CANCELED"})
WALL_TARGET = 0.2
FIRST_TARGET = 1.1
RSS_TARGET = 1.1
MIB = 1024 * 1024


def kit() -> dict[str, Path] | None:
    source = os.environ.get("SD_REST_REAL_FORK", "").strip()
    if not source:
        return None
    root = Path(
        os.environ.get("SD_REST_REAL_FORK_CACHE", "") or Path.home() / ".cache/sd-rest/real-fork"
    )
    repository = forkkit.build(Path(source), root)
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


def run_jobs(client: Client, numbers: range, seed: int | None = None) -> tuple[float, list[float]]:
    """Submit the jobs one after another, each once the previous is done: (wall seconds, each
    job's seconds from POST to COMPLETE)."""
    began = time.perf_counter()
    each = []
    for n in numbers:
        start = time.perf_counter()
        url = client.submit(job(n, seed))
        doc = client.wait_status(url, TERMINAL, timeout=600)
        if doc["status"] != "COMPLETE":
            raise RuntimeError(f"job {n} ended {doc}")
        each.append(time.perf_counter() - start)
    return time.perf_counter() - began, each


def worker(client: Client) -> dict[str, Any]:
    (only,) = client.get_json("/")["workers"]
    return dict(only)


def peak_rss_during(pid: int, action: Any) -> tuple[int, int]:
    """(RSS before, peak RSS while `action()` runs), sampled every 2 ms."""
    before = rss_bytes(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return before, peak


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    paths = kit()
    name = "resident worker vs a process per job (real fork, tiny models)"
    if paths is None:
        return [Result(name, "skipped: set SD_REST_REAL_FORK to the real fork's kit")]
    jobs, more = sizes.resident_jobs, sizes.resident_more
    with server(workdir, cert, paths, "process").start(timeout=120) as process_server:
        process_wall, process_each = run_jobs(Client(process_server.port), range(jobs))
    with server(workdir, cert, paths, "resident").start(timeout=120) as resident_server:
        client = Client(resident_server.port)
        resident_wall, resident_each = run_jobs(client, range(jobs))
        info = worker(client)
        pid = int(info["pid"])
        run_jobs(client, range(jobs, max(jobs, 5)))
        rss_5 = rss_bytes(pid)
        # The same job twice but for the generator's work: the first build's seed again (its
        # recorded end state serves as is), then a new seed (the generator is jumped).
        _, same_seed = peak_rss_during(pid, lambda: run_jobs(client, range(2000, 2001), 1000))
        _, jumped = peak_rss_during(pid, lambda: run_jobs(client, range(2001, 2002), 777))
        done = max(jobs, 5) + 2
        run_jobs(client, range(done, done + more))
        rss_50 = rss_bytes(pid)
        info = worker(client)
    models = info.get("models") or []
    weights = sum(int(m.get("params") or 0) for m in models) * 4  # float32
    generator = ", ".join(str(m.get("generator")) for m in models) or "?"
    median_process = statistics.median(process_each)
    wall_ratio = resident_wall / process_wall
    first_ratio = resident_each[0] / median_process
    rss_ratio = rss_50 / rss_5
    extra = jumped - same_seed
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
            "first resident job / a process job",
            f"{resident_each[0]:.2f} s / {median_process:.2f} s = {first_ratio:.2f}×",
            f"≤ {FIRST_TARGET}×",
            first_ratio <= FIRST_TARGET,
        ),
        Result(
            f"worker RSS after {served} jobs / after 5",
            f"{rss_50 / MIB:.1f} MiB / {rss_5 / MIB:.1f} MiB = {rss_ratio:.3f}×",
            f"≤ {RSS_TARGET}×",
            rss_ratio <= RSS_TARGET,
        ),
        Result(
            "memory a job needs to keep the generator in step",
            f"{extra / MIB:+.2f} MiB = {extra / weights:+.2%} of the model's "
            f"{weights / MIB:.1f} MiB of weights"
            if weights
            else f"{extra / MIB:+.2f} MiB (weights unknown)",
            "",
            None,
            note=f"kept in step by: {generator}; the worker's peak RSS during a job whose "
            "generator is jumped, less the peak during the same job with the first build's "
            "seed (which needs no work): sampled every 2 ms, so a few hundred KiB is noise",
        ),
    ]
