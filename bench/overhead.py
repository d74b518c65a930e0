"""Per-job overhead: one-image jobs through the server (POST → COMPLETE seen by a client) against
the same script run directly (same interpreter, argv, working folder and environment).

The server runs each job as a fresh process (`--runner process`), as the direct runs do: the
overhead is what the server adds around a script. (Its default, resident workers, skip the
script's imports and model load after the first job, so through the server a job takes less
time than run directly: the `resident` measure compares the two on the real fork's code.)

Runs alternate (direct, server, direct, ...) so that drift in the machine's speed hits both.
The server's argv is taken from the simulator's SD_SIM_ARGV_LOG, written by the server's own
first (warm-up) run, so the direct runs do exactly what the server does, in a fresh --outdir.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .common import (
    Client,
    Result,
    ServerProcess,
    Sizes,
    ms,
    percentile,
    simulator_env,
    summary_ms,
)

LOAD_SECONDS = 0.2
STEP_SECONDS = 0.02
STEPS = 10
POLL_SECONDS = 0.001  # the client's status polling near the end: how late COMPLETE is seen
SLOW_POLL_SECONDS = 0.05  # before then
EARLY = 0.8  # fast polling starts at this fraction of a direct run's duration
TARGET = 0.010


def job_params(n: int) -> dict[str, object]:
    # 256×256 (the smallest the scripts take): less of the simulator's own CPU time, less noise.
    return {
        "prompt": f"overhead {n} {uuid.uuid4().hex}",
        "steps": STEPS,
        "width": 256,
        "height": 256,
    }


def through_server(client: Client, n: int, expected: float) -> float:
    """Seconds from sending the POST to receiving the first status that says COMPLETE.

    Polling costs the server and the machine CPU, which would slow the script it is measuring:
    poll slowly until the job is nearly due (`expected`: a direct run's duration), then fast."""
    start = time.perf_counter()
    url = client.submit(job_params(n))
    while True:
        doc = client.get_json(url)
        if doc["status"] == "COMPLETE":
            return time.perf_counter() - start
        if doc["status"] in ("FAILED", "CANCELED"):
            raise RuntimeError(f"job {url} ended {doc}")
        due = time.perf_counter() - start > EARLY * expected
        time.sleep(POLL_SECONDS if due else SLOW_POLL_SECONDS)


def direct_command(logged: dict[str, Any], outdir: Path) -> list[str]:
    """The logged run's argv (sys.argv: the script first) with its own --outdir."""
    args = [f"--outdir={outdir}" if arg.startswith("--outdir=") else arg for arg in logged["argv"]]
    return [sys.executable, *args]


def script_env(server_env: dict[str, str], repository: Path) -> dict[str, str]:
    from sd_rest.scripts import script_environment

    return script_environment(server_env, repository)


def run_direct(command: list[str], cwd: str, env: dict[str, str], log: Path) -> float:
    with open(log, "ab") as out:
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=out, check=True)
        return time.perf_counter() - start


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    argv_log = workdir / "argv.jsonl"
    env = simulator_env(LOAD_SECONDS, STEP_SECONDS, {"SD_SIM_ARGV_LOG": str(argv_log)})
    direct: list[float] = []
    served: list[float] = []
    args = ["--runner", "process"]
    with ServerProcess(workdir / "output", cert, env, args).start() as server:
        client = Client(server.port)
        through_server(client, -1, 0.0)  # warm-up; its argv is the one replayed directly
        logged = json.loads(argv_log.read_text().splitlines()[0])
        # text-to-image runs in the repository: its working folder is the repository.
        cwd, denv = logged["cwd"], script_env(env, Path(logged["cwd"]))
        log = workdir / "direct.log"
        run_direct(direct_command(logged, workdir / "direct" / "warm"), cwd, denv, log)
        for n in range(sizes.overhead_jobs):
            outdir = workdir / "direct" / str(n)
            direct.append(run_direct(direct_command(logged, outdir), cwd, denv, log))
            served.append(through_server(client, n, statistics.median(direct)))
        client.close()
    overhead = statistics.median(served) - statistics.median(direct)
    # Each server job also forms a pair with the direct run just before it: a slow spell of a
    # shared machine hits both halves of a pair. The fastest runs show the least interference.
    paired = [s - d for s, d in zip(served, direct, strict=True)]
    fastest = min(served) - min(direct)
    return [
        Result(
            "per-job overhead (server − direct, medians)",
            ms(overhead),
            "≤ 10 ms",
            overhead <= TARGET,
            f"{sizes.overhead_jobs} one-image jobs each way: direct median "
            f"{ms(statistics.median(direct))}, through the server {ms(statistics.median(served))}; "
            f"median of pairs {ms(statistics.median(paired))} (IQR {ms(percentile(paired, 25))} "
            f"… {ms(percentile(paired, 75))}), fastest − fastest {ms(fastest)}; the client polls "
            f"every {POLL_SECONDS * 1000:.0f} ms once 80% of a direct run's time has passed",
            {
                "overhead_ms": round(overhead * 1000, 3),
                "fastest_ms": round(fastest * 1000, 3),
                "paired": summary_ms(paired),
                "direct": summary_ms(direct),
                "server": summary_ms(served),
                "direct_s": [round(x, 4) for x in direct],
                "server_s": [round(x, 4) for x in served],
            },
        )
    ]
