"""Worker hosts for the cluster's tests: real `python -m sd_rest worker` processes on this
machine, each standing in for a machine of its own (its own folder, its own process group, so
that killing a "host" kills everything on it, as a power cut would)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import FAST_SIMULATOR, ROOT, Server, wait_until


@dataclass
class WorkerHost:
    folder: Path
    broker: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    demo: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "worker.log"

    def command(self) -> list[str]:
        demo = ["--demo"] if self.demo else []
        return [sys.executable, "-m", "sd_rest", "worker", *demo, "--broker", self.broker,
                *self.args]  # fmt: skip

    def start(self) -> WorkerHost:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **FAST_SIMULATOR, "SD_REST_WORKER_DIR": str(self.folder / "dir")}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,  # the host's process group: kill() takes all of it
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal_all(self, sig: int) -> None:
        """`sig` to every process of the host (the worker, its resident worker, the script)."""
        assert self.process is not None
        os.killpg(self.pid, sig)

    def kill(self) -> None:
        """The host dies at once: every process of it, SIGKILL."""
        if self.process is not None and self.process.poll() is None:
            self.signal_all(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean stop), then whatever is left is killed."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with _gone_ok():
                self.signal_all(signal.SIGCONT)  # a host a test stopped cannot exit
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with _gone_ok():  # children it left behind
            os.killpg(self.pid, signal.SIGKILL)
        return self.process.returncode


class _gone_ok:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)


def listed_workers(server: Server) -> list[dict]:
    return server.get("/").json()["workers"]


def wait_hosts(server: Server, count: int, timeout: float = 30.0) -> list[dict]:
    """Until `GET /` lists `count` live worker hosts, all idle (warmed up)."""
    return wait_until(
        lambda: (w := listed_workers(server)) and len(w) == count
        and all(x["state"] == "idle" for x in w) and w,
        f"{count} idle worker host(s) in GET /",
        timeout,
    )


def wait_status(server: Server, url: str, statuses: set[str], timeout: float = 30.0) -> dict:
    return wait_until(
        lambda: (doc := server.get(url).json())["status"] in statuses and doc,
        f"{url} to reach {sorted(statuses)}",
        timeout,
    )


def host_running(server: Server, url: str, hosts: list[WorkerHost], timeout: float = 30.0):
    """The host whose worker runs job `url` now (from the job's status `worker`)."""
    doc = wait_until(
        lambda: (d := server.get(url).json()).get("worker") and d["status"] == "IN_PROGRESS"
        and d,
        f"{url} to run on a worker host",
        timeout,
    )
    pid = doc["worker"]["pid"]
    return next(host for host in hosts if host.pid == pid), doc


def stop_all(hosts: list[WorkerHost]) -> None:
    for host in hosts:
        if host.process is not None and host.process.poll() is None:
            with _gone_ok():
                host.signal_all(signal.SIGCONT)
            host.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for host in hosts:
        if host.process is None:
            continue
        try:
            host.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            host.kill()
        with _gone_ok():
            os.killpg(host.pid, signal.SIGKILL)
