"""`python -m bench --only cluster`: worker hosts behind one API node, on a real redis-server.

Every host is a `python -m sd_rest worker --demo` process on this machine, standing in for a
machine of its own; the API node is `python -m sd_rest --demo --broker URL`.

- Throughput: the same fixed-time simulator jobs on 1, 2 and 4 hosts (jobs per second, from
  the first POST to the last COMPLETE); 2 hosts should give at least 1.9× one.
- POST → started on a worker: from the POST's send to the job's `startedAt` (the API node's
  clock when the worker's `started` entry was kept; one machine, one clock), one job at a time
  on an idle host.
- Progress step → event, and a 1 MB PNG written on a worker → its `image` event: the simulator
  logs the time of each bar redraw and each closed PNG (SD_SIM_EVENT_LOG, as for `eventlag`);
  one client reads the job's event stream in its own process. The hosts run each job in a fresh
  process (`--runner process`) with a model load of 0.5 s, so the client is connected before the
  first step.
- The API node's RSS with 4 hosts and 1,000 queued jobs.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from .common import (
    TERMINAL,
    Client,
    Result,
    ServerProcess,
    Sizes,
    free_port,
    ms,
    percentile,
    rss_bytes,
    simulator_env,
    summary_ms,
)
from .streams import job_stream_lags

PASSWORD = "bench-cluster"
HEARTBEAT = "10"
SPEEDUP_TARGET = 1.9
STARTED_TARGET = 0.100
PROGRESS_TARGET = 0.030
IMAGE_TARGET = 0.150
IDLE_MOST = 2.0  # seconds: the longest pause between two jobs of the POST → started measure
PNG_BYTES = 1_000_000
MIB = 1024 * 1024


class RedisProcess:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import redis

        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


class Cluster:
    """Redis, an API node and `hosts` worker hosts, all on this machine."""

    def __init__(
        self,
        workdir: Path,
        cert: tuple[Path, Path],
        hosts: int,
        env: dict[str, str],
        worker_args: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.redis = RedisProcess(workdir / "redis")
        self.api = ServerProcess(workdir / "output", cert, env)
        self.env = env
        self.hosts = hosts
        self.worker_args = worker_args or []
        self.workers: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Cluster:
        self.redis.start()
        self.api.args = ["--broker", self.redis.url, "--heartbeat-timeout", HEARTBEAT]
        self.api.start()
        for n in range(self.hosts):
            folder = self.workdir / f"host{n}"
            folder.mkdir(parents=True, exist_ok=True)
            env = {**self.env, "SD_REST_WORKER_DIR": str(folder)}
            with open(folder / "worker.log", "ab") as log:
                self.workers.append(
                    subprocess.Popen(
                        [
                            sys.executable, "-m", "sd_rest", "worker", "--demo",
                            "--broker", self.redis.url, "--heartbeat-timeout", HEARTBEAT,
                            *self.worker_args,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=folder,
                        start_new_session=True,
                    )
                )
        self.wait_hosts()
        return self

    def wait_hosts(self, timeout: float = 60.0) -> None:
        """Until the API node lists every host, each idle (warmed up)."""
        client = Client(self.api.port)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                workers = client.get_json("/")["workers"]
                if len(workers) == self.hosts and all(w["state"] == "idle" for w in workers):
                    return
                for process in self.workers:
                    if process.poll() is not None:
                        raise RuntimeError(f"a worker host exited:\n{self.worker_log()}")
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"{self.hosts} hosts not listed idle within {timeout} s")

    def worker_log(self) -> str:
        logs = sorted(self.workdir.glob("host*/worker.log"))
        return "\n".join(path.read_text(errors="replace")[-2000:] for path in logs)

    def __exit__(self, *_exc: object) -> None:
        for process in self.workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self.api.stop()
        self.redis.stop()


def _job(tag: str, steps: int, iterations: int = 1) -> dict[str, Any]:
    return {"prompt": f"{tag} {uuid.uuid4().hex}", "steps": steps, "iterations": iterations}


def _throughput(cluster: Cluster, jobs: int, steps: int) -> float:
    """Jobs per second: `jobs` fixed-time jobs posted at once, to the last COMPLETE."""
    client = Client(cluster.api.port)
    try:
        began = time.monotonic()
        urls = [client.submit(_job("throughput", steps)) for _ in range(jobs)]
        for url in urls:
            doc = client.wait_status(url, TERMINAL, timeout=600)
            if doc["status"] != "COMPLETE":
                raise RuntimeError(f"{url} ended {doc}")
        return jobs / (time.monotonic() - began)
    finally:
        client.close()


def _post_to_started(cluster: Cluster, jobs: int) -> list[float]:
    """From each POST's send to the job's startedAt, one job at a time on an idle host, a
    random pause of up to 2 s between two jobs: the host's polling after an idle spell is
    part of the measure (a quiet host must not be slow to start the next job)."""
    delays: list[float] = []
    client = Client(cluster.api.port)
    pauses = random.Random(19)
    try:
        sent: dict[str, float] = {}
        for _ in range(jobs):
            time.sleep(pauses.uniform(0, IDLE_MOST))
            at = time.time()
            url = client.submit(_job("started", 2))
            sent[url.rsplit("/", 1)[1]] = at
            client.wait_status(url, TERMINAL, timeout=60)
        listing = client.get_json(f"/jobs?limit={max(jobs, 1)}")
        for item in listing["items"]:
            if item["id"] in sent:
                started = datetime.fromisoformat(item["startedAt"].replace("Z", "+00:00"))
                delays.append(started.timestamp() - sent[item["id"]])
    finally:
        client.close()
    return delays


def _stream_lags(
    workdir: Path, cert: tuple[Path, Path], jobs: int
) -> tuple[list[float], list[float]]:
    event_log = workdir / "events.jsonl"
    env = simulator_env(
        0.5, 0.05, {"SD_SIM_EVENT_LOG": str(event_log), "SD_SIM_PNG_BYTES": str(PNG_BYTES)}
    )
    steps: list[float] = []
    images: list[float] = []
    with Cluster(workdir, cert, 1, env, ["--runner", "process"]) as cluster:
        client = Client(cluster.api.port)
        offset = event_log.stat().st_size if event_log.exists() else 0
        try:
            for _ in range(jobs):
                url = client.submit(_job("lag", 12, iterations=4))
                step_lags, image_lags, offset = job_stream_lags(
                    cluster.api.port, url, event_log, offset
                )
                steps += step_lags
                images += image_lags
        finally:
            client.close()
    return steps, images


def _queued_rss(cluster: Cluster, jobs: int) -> tuple[int, int]:
    """The API node's RSS before and after `jobs` more jobs queue behind its busy hosts."""
    client = Client(cluster.api.port)
    try:
        before = rss_bytes(cluster.api.pid)
        for _ in range(jobs):
            client.submit(_job("queued", 250))
        time.sleep(2.0)  # the follower and the registry cache settle
        return before, rss_bytes(cluster.api.pid)
    finally:
        client.close()


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    env = simulator_env(0.1, 0.05)
    rates: dict[int, float] = {}
    started: list[float] = []
    for hosts in (1, 2, 4):
        with Cluster(workdir / f"hosts{hosts}", cert, hosts, env) as cluster:
            jobs = sizes.cluster_jobs_per_host * 4
            rates[hosts] = _throughput(cluster, jobs, sizes.cluster_steps)
            if hosts == 1:
                started = _post_to_started(cluster, sizes.cluster_started)
            if hosts == 4:
                before, after = _queued_rss(cluster, sizes.cluster_queued)
    speedup = rates[2] / rates[1]
    steps, images = _stream_lags(workdir / "lag", cert, sizes.cluster_lag_jobs)
    queued = sizes.cluster_queued
    per_host = sizes.cluster_jobs_per_host
    return [
        Result(
            "cluster throughput, jobs/s with 1 / 2 / 4 hosts",
            " / ".join(f"{rates[h]:.2f}" for h in (1, 2, 4)),
            f"2 hosts ≥ {SPEEDUP_TARGET}× one",
            speedup >= SPEEDUP_TARGET,
            f"2 hosts: {speedup:.2f}×, 4 hosts: {rates[4] / rates[1]:.2f}× "
            f"({per_host * 4} jobs of {sizes.cluster_steps} steps × 50 ms each; one machine, "
            "2 cores)",
        ),
        Result(
            "cluster POST → started on a worker, p50 / p95",
            f"{ms(percentile(started, 50))} / {ms(percentile(started, 95))}",
            "p95 ≤ 100 ms",
            percentile(started, 95) <= STARTED_TARGET,
            f"{len(started)} jobs, one at a time on an idle host, 0–{IDLE_MOST:g} s apart; to the "
            "API node's startedAt",
            summary_ms(started),
        ),
        Result(
            "cluster progress step → event at a client, p50 / p95",
            f"{ms(percentile(steps, 50))} / {ms(percentile(steps, 95))}",
            "p95 ≤ 30 ms",
            percentile(steps, 95) <= PROGRESS_TARGET,
            f"{len(steps)} redraws; worker → Redis stream → API node → event stream",
            summary_ms(steps),
        ),
        Result(
            "cluster 1 MB PNG on a worker → image event, p50 / p95",
            f"{ms(percentile(images, 50))} / {ms(percentile(images, 95))}",
            "p95 ≤ 150 ms",
            percentile(images, 95) <= IMAGE_TARGET,
            f"{len(images)} images of {PNG_BYTES} bytes",
            summary_ms(images),
        ),
        Result(
            f"cluster API node RSS, 4 hosts and {queued} queued jobs",
            f"{after / MIB:.0f} MiB",
            "",
            None,
            f"{before / MIB:.0f} MiB before the jobs were posted (after the throughput jobs)",
        ),
    ]
