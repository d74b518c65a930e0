"""Status GETs per second: 64 keep-alive HTTPS connections from another process, on the status
URL of a job whose script is running (its progress changes several times a second)."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .common import (
    ROOT,
    Client,
    Result,
    ServerProcess,
    Sizes,
    cpu_seconds,
    free_port,
    percentile,
    simulator_env,
)

# A job that runs far longer than the load: 250 steps (the most) of 0.25 s, redrawn every step.
STEP_SECONDS = 0.25
STEPS = 250
TARGET = 15_000.0
GENERATORS = ("auto", "wrk", "python")


@dataclass
class Load:
    generator: str  # "wrk" or "python"
    rate: float  # completed 200 responses per second
    requests: int
    errors: int  # non-200 answers, socket errors, timeouts
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "generator": self.generator,
            "rate": round(self.rate, 1),
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms": self.latency_ms,
        }


def choose_generator(requested: str) -> str:
    if requested == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if requested == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    return requested


# --- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Load:
    """Requests/sec, totals, errors and the latency distribution from `wrk --latency`."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rate is None or total is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    latency = {
        f"p{p}": round(_duration_ms(value), 3)
        for p, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.MULTILINE)
    }
    return Load("wrk", float(rate.group(1)), int(total.group(1)), errors, latency)


def run_wrk(url: str, connections: int, threads: int, seconds: int) -> Load:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    return parse_wrk(out.stdout)


# --- the Python generator ---------------------------------------------------------------------


def run_python(port: int, path: str, connections: int, processes: int, seconds: float) -> Load:
    """`processes` generator processes sharing `connections` between them; rates are summed."""
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                "127.0.0.1",
                str(port),
                path,
                str(n),
                str(seconds),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for n in shares
        if n
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"bench.loadgen failed ({proc.returncode})")
        results.append(json.loads(out))
    latencies = [lat for result in results for lat in result["latencies"]]
    return Load(
        "python",
        sum(result["requests"] / result["seconds"] for result in results),
        sum(result["requests"] for result in results),
        sum(result["errors"] for result in results),
        {f"p{p}": round(percentile(latencies, p) * 1000, 3) for p in (50, 75, 90, 99)},
    )


def generate_load(generator: str, port: int, path: str, sizes: Sizes) -> Load:
    if generator == "wrk":
        url = f"https://127.0.0.1:{port}{path}"
        return run_wrk(url, sizes.get_connections, sizes.get_threads, sizes.get_seconds)
    return run_python(port, path, sizes.get_connections, sizes.get_threads, sizes.get_seconds)


# --- the servers ------------------------------------------------------------------------------


def bare_server(cert: tuple[Path, Path], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare", str(port), str(cert[0]), str(cert[1])],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 20
    client = Client(port, timeout=2)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bench.bare exited: {log.read_text(errors='replace')}")
            try:
                client.request("GET", "/")
                client.close()
                return proc, port
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise


@dataclass
class Rounds:
    """Loads on one server, and the CPU time the server used per answered request."""

    loads: list[Load] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def add(self, pid: int, load: Callable[[], Load]) -> None:
        before = cpu_seconds(pid)
        result = load()
        self.loads.append(result)
        self.cpu_us.append((cpu_seconds(pid) - before) * 1e6 / max(result.requests, 1))

    @property
    def rate(self) -> float:
        return statistics.median(load.rate for load in self.loads)

    @property
    def errors(self) -> int:
        return sum(load.errors for load in self.loads)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_us)

    def to_json(self) -> dict[str, object]:
        return {
            "rate_median": round(self.rate, 1),
            "cpu_us_per_request_median": round(self.cpu, 1),
            "rounds": [
                {**load.to_json(), "cpu_us_per_request": round(cpu, 1)}
                for load, cpu in zip(self.loads, self.cpu_us, strict=True)
            ],
        }


def measure(
    workdir: Path, cert: tuple[Path, Path], sizes: Sizes, generator: str = "auto"
) -> list[Result]:
    generator = choose_generator(generator)
    env = simulator_env(0.0, STEP_SECONDS)
    served, bare = Rounds(), Rounds()
    with ServerProcess(workdir / "output", cert, env).start() as server:
        client = Client(server.port)
        url = client.submit({"prompt": "a long-running job under load", "steps": STEPS})
        client.wait_status(url, {"IN_PROGRESS"})
        proc, port = bare_server(cert, workdir / "bare.log") if sizes.bare_baseline else (None, 0)
        try:
            for _ in range(sizes.get_rounds):
                served.add(server.pid, lambda: generate_load(generator, server.port, url, sizes))
                if proc is not None:
                    bare.add(proc.pid, lambda: generate_load(generator, port, "/x", sizes))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        after = client.get_json(url)
        client.close()
    if after["status"] != "IN_PROGRESS":
        raise RuntimeError(f"the job was not running for the whole load: {after}")
    label = "wrk" if generator == "wrk" else "python load generator (client-bound: a lower bound)"
    last = served.loads[-1]
    results = [
        Result(
            "status GETs per second, 64 keep-alive HTTPS clients, job running",
            f"{served.rate:,.0f}/s",
            f"≥ {TARGET:,.0f}/s",
            served.rate >= TARGET and served.errors == 0 if generator == "wrk" else None,
            f"{label}, {sizes.get_connections} connections, {sizes.get_threads} "
            f"{'threads' if generator == 'wrk' else 'processes'}; median of {sizes.get_rounds} "
            f"× {sizes.get_seconds} s; {served.errors} errors; server CPU "
            f"{served.cpu:.0f} µs per request; latency p50 {last.latency_ms.get('p50')} ms, "
            f"p99 {last.latency_ms.get('p99')} ms",
            served.to_json(),
        )
    ]
    if bare.loads:
        results.append(
            Result(
                "  (info) the same load on a bare aiohttp HTTPS handler",
                f"{bare.rate:,.0f}/s",
                "",
                None,
                f"rounds alternate with the row above; CPU {bare.cpu:.0f} µs per request: "
                f"sd-rest does {served.rate / bare.rate:.0%} of a bare handler's rate here",
                bare.to_json(),
            )
        )
    return results
