"""The benchmark must keep working: a quick run with tiny sizes (its figures are meaningless and
nothing here looks at them), and the pieces it falls back on when `wrk` is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.__main__ import MEASURES
from bench.common import Client
from bench.get_throughput import parse_wrk, run_python
from helpers import ROOT, free_port
from realfork import RealFork
from redisserver import skip_reason as redis_skip_reason

WRK_OUTPUT = """\
Running 1s test @ https://127.0.0.1:19002/x
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   394.86us  362.81us   8.47ms   98.43%
    Req/Sec    10.75k     2.81k   15.44k    70.00%
  Latency Distribution
     50%  362.00us
     75%  439.00us
     90%  500.00us
     99%    1.63ms
  10698 requests in 1.00s, 3.31MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  10688.20
Transfer/sec:      3.30MB
"""


def test_quick_run_takes_every_measure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # The resident measure needs the real fork's kit: its own test, in the real_fork group; the
    # cluster's needs redis-server: its own test too, skipped without one.
    everything_else = [name for name in MEASURES if name not in ("resident", "cluster")]
    only = ",".join(everything_else)
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out), "--only", only],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    names = " ".join(result["measure"] for result in doc["results"])
    words_of_each = ("POST", "GETs per second", "progress lag", "image lag", "overhead", "restart")
    for words in (*words_of_each, "connections"):
        assert words in names
    for words in ("event lag", "clients streaming", "RSS growth", "streams / without", "listing"):
        assert words in names
    assert "memory" in names
    assert "never read" in names and "all dropped" in names
    for result in doc["results"]:
        assert not result["figure"].startswith("error"), result
    assert "| measure | result | target | met |" in run.stdout


@pytest.mark.real_fork
def test_quick_resident_measure_on_the_real_fork(tmp_path: Path, real_fork: RealFork) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "SD_REST_REAL_FORK": str(real_fork.kit)}
    env["SD_REST_REAL_FORK_CACHE"] = str(real_fork.root)
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "resident", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())["results"]
    names = " ".join(result["measure"] for result in results)
    for words in ("wall time", "first resident job", "worker RSS", "generator in step"):
        assert words in names
    assert not any(r["figure"].startswith(("error", "skipped")) for r in results), results


def test_quick_cluster_measure(tmp_path: Path) -> None:
    reason = redis_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "cluster", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())["results"]
    names = " ".join(result["measure"] for result in results)
    for words in ("throughput", "POST → started", "progress step", "1 MB PNG", "RSS"):
        assert words in names
    assert not any(r["figure"].startswith("error") for r in results), results


def test_python_load_generator_counts_answers(tmp_path: Path, certs: tuple[str, str, str]) -> None:
    cert, key, _ = certs
    port = free_port()
    bare = subprocess.Popen(
        [sys.executable, "-m", "bench.bare", str(port), cert, key],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        client = Client(port, timeout=2)
        while True:
            try:
                client.request("GET", "/")
                client.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "bench.bare did not start"
                time.sleep(0.05)
        load = run_python(port, "/text-to-image/0", connections=3, processes=2, seconds=0.3)
    finally:
        bare.terminate()
        bare.wait(10)
    assert load.generator == "python"
    assert load.requests > 0 and load.rate > 0
    assert load.errors == 0
    assert set(load.latency_ms) == {"p50", "p75", "p90", "p99"}


def test_wrk_output_is_read() -> None:
    load = parse_wrk(WRK_OUTPUT)
    assert load.rate == 10688.20
    assert load.requests == 10698
    assert load.errors == 4 + 3
    assert load.latency_ms == {"p50": 0.362, "p75": 0.439, "p90": 0.5, "p99": 1.63}
