"""The resident worker's driver started as the server starts it, and scripts run by hand as
the server runs them today: what test_worker_driver.py and test_worker_driver_real.py compare.

A worker: `<python> sd_rest/worker_driver` on a pty made by pexpect (with the server's
dimensions and signal reset), cwd = the repository, env = `scripts.script_environment()` plus
SD_REST_WORKER_SOCKET (a Unix socket in a private 0700 folder, listened on here) and
SD_REST_WORKER_TOKEN. By hand: one fresh process per run, inpaint seeded by a sitecustomize.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pexpect

from sd_rest.runs.processes import reset_signals
from sd_rest.scripts import PTY_COLUMNS, PTY_ROWS, script_environment, sitecustomize_source

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "sd_rest" / "worker_driver"
SOCKET_ENV, TOKEN_ENV = "SD_REST_WORKER_SOCKET", "SD_REST_WORKER_TOKEN"

Event = dict[str, Any]


@dataclass
class Finished:
    """A job's "finished" event, its pty output up to the marker, and timings."""

    event: Event
    output: bytes
    wall: float
    cancel_latency: float | None = None

    def __getitem__(self, key: str) -> Any:
        return self.event[key]

    @property
    def text(self) -> str:
        """The output as a run by hand would print it (the pty turns \\n into \\r\\n)."""
        return self.output.decode(errors="replace").replace("\r\n", "\n")


@dataclass
class Worker:
    python: Path
    repository: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    expected_token: str | None = None  # what the "server" accepts (default: the token)

    def start(self, ready_timeout: float = 60) -> Worker:
        self._folder = Path(tempfile.mkdtemp(prefix="sd-rest-worker-"))
        self._folder.chmod(0o700)
        path = self._folder / "control.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        env = script_environment(os.environ, self.repository)
        env.update(self.extra_env)
        env.update({SOCKET_ENV: str(path), TOKEN_ENV: self.token})
        self.child = pexpect.spawn(
            str(self.python),
            [str(DRIVER)],
            cwd=str(self.repository),
            env=env,
            dimensions=(PTY_ROWS, PTY_COLUMNS),
            echo=False,
            preexec_fn=reset_signals,
        )
        self.pid: int = self.child.pid
        self.output = bytearray()
        self._events: list[Event] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read_pty, daemon=True).start()
        self._listener.settimeout(ready_timeout)
        self.conn, _ = self._listener.accept()
        threading.Thread(target=self._read_socket, daemon=True).start()
        self.ready = self.wait_event(lambda e: e["event"] == "ready", ready_timeout)
        if self.ready.get("token") != (self.expected_token or self.token):
            self.drop()  # what the server does with a connection whose token is wrong
        return self

    def _read_pty(self) -> None:
        while True:
            try:
                data = os.read(self.child.child_fd, 65536)
            except OSError:  # EIO: the worker is gone
                data = b""
            with self._changed:
                if not data:
                    self._events.append({"event": "pty-eof"})
                    self._changed.notify_all()
                    return
                self.output.extend(data)
                self._changed.notify_all()

    def _read_socket(self) -> None:
        pending = b""
        while True:
            try:
                chunk = self.conn.recv(65536)
            except OSError:
                chunk = b""
            with self._changed:
                if not chunk:
                    self._events.append({"event": "eof"})
                    self._changed.notify_all()
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self._events.append(json.loads(line))
                self._changed.notify_all()

    def send(self, message: Mapping[str, Any]) -> None:
        self.conn.sendall((json.dumps(message) + "\n").encode())

    def wait_event(self, match: Callable[[Event], bool], timeout: float = 60) -> Event:
        """The first unclaimed event that matches (claimed by this call)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for i, event in enumerate(self._events):
                    if match(event):
                        return self._events.pop(i)
                if any(event["event"] == "eof" for event in self._events):
                    # Nothing comes after the socket's end: say why now, not after the time-out.
                    tail = bytes(self.output[-4000:]).decode(errors="replace")
                    raise AssertionError(f"the worker ended: {self._events}\n{tail}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event in {timeout} s: {self._events}")
                self._changed.wait(left)

    def wait_output(self, pattern: re.Pattern[bytes], start: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not pattern.search(bytes(self.output[start:])):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"never saw {pattern.pattern!r}")
                self._changed.wait(left)

    def run(
        self,
        job: str,
        script: Path,
        argv: list[str],
        cwd: Path,
        seed: int | None = None,
        interrupt_when: re.Pattern[bytes] | None = None,
        timeout: float = 120,
    ) -> Finished:
        """One job as the server runs it; with interrupt_when, SIGINT the worker's process
        group (the server's cancel) once this job's output matches it."""
        start = len(self.output)
        marker = f"\x1b]sd-rest;end;{job}\x07".encode()
        began = time.monotonic()
        self.send({
            "op": "run", "job": job, "script": str(script), "argv": argv, "cwd": str(cwd),
            "seed": seed, "marker": marker.decode(),
        })  # fmt: skip
        interrupted_at = None
        if interrupt_when is not None:
            self.wait_output(interrupt_when, start, timeout)
            interrupted_at = time.monotonic()
            os.killpg(self.pid, signal.SIGINT)
        event = self.wait_event(lambda e: e["event"] == "finished" and e["job"] == job, timeout)
        ended = time.monotonic()
        # Pty data can arrive after the socket's "finished": the marker says when it is all in.
        self.wait_output(re.compile(re.escape(marker)), start, 10)
        output = bytes(self.output[start:]).split(marker)[0]
        latency = ended - interrupted_at if interrupted_at is not None else None
        return Finished(event, output, ended - began, latency)

    def status(self) -> Event:
        self.send({"op": "status"})
        return self.wait_event(lambda e: e["event"] == "status", 30)

    def check(self) -> Event:
        self.send({"op": "check"})
        return self.wait_event(lambda e: e["event"] == "check", 120)

    def drop(self) -> None:
        """Close the server's end, as a dead server's kernel would (shutdown wakes the reader
        thread; close alone would not while it is blocked in recv)."""
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()

    def wait_exit(self, timeout: float) -> int | None:
        """The worker's exit status once it is gone (None if killed by a signal)."""
        deadline = time.monotonic() + timeout
        while self.child.isalive():
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker is still running after {timeout} s")
            time.sleep(0.01)
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            try:
                self.send({"op": "exit"})
                self.wait_exit(10)
            except (OSError, AssertionError):
                self.child.kill(signal.SIGKILL)
        self.drop()
        self.child.close(force=True)
        self._listener.close()
        shutil.rmtree(self._folder, ignore_errors=True)


def run_by_hand(
    python: Path,
    repository: Path,
    script: Path,
    argv: list[str],
    cwd: Path,
    seed: int | None,
    site_root: Path,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """One fresh process, as the server runs a job today (inpaint: seeded by a sitecustomize)."""
    site = None
    if seed is not None:
        site = site_root / f"site-{seed}"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(sitecustomize_source(seed))
    env = script_environment(os.environ, repository, site)
    env.update(extra_env or {})
    return subprocess.run(
        [str(python), str(script), *argv], cwd=cwd, env=env, capture_output=True, timeout=timeout
    )


def pngs(outdir: Path) -> dict[str, bytes]:
    """Every PNG a run wrote below its outdir, by relative path."""
    if not outdir.exists():
        return {}
    return {str(p.relative_to(outdir)): p.read_bytes() for p in sorted(outdir.rglob("*.png"))}


def inpaint_cwd(root: Path, repository: Path, checkpoint: Path) -> Path:
    """What the server makes for an inpaint run: a cwd whose models/ldm/inpainting_big holds
    links to the repository's config and the chosen checkpoint."""
    folder = root / "models" / "ldm" / "inpainting_big"
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("config.yaml", repository / "models" / "ldm" / "inpainting_big" / "config.yaml"),
        ("last.ckpt", checkpoint),
    ):
        if not (folder / name).exists():
            (folder / name).symlink_to(target)
    return root


def traceback_of(text: str) -> str:
    """From the last "Traceback (most recent call last):" to the end."""
    start = text.rfind("Traceback (most recent call last):")
    return text[start:].strip() if start >= 0 else ""
