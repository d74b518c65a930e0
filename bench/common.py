"""What every measure shares: sizes, results, certificates, a server process and a client."""

from __future__ import annotations

import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_rest.setup.demo import make_self_signed_certificate

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = "text-to-image"
TERMINAL = frozenset({"COMPLETE", "FAILED", "CANCELED"})


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run does: the real sizes, or tiny ones for the smoke test."""

    posts: int = 200
    get_seconds: int = 5  # per round
    get_rounds: int = 3  # rounds alternate the server and the bare handler: a shared machine drifts
    get_connections: int = 64
    get_threads: int = 2  # wrk threads; the python generator uses as many processes
    lag_jobs: int = 5
    lag_iterations: int = 4
    lag_steps: int = 12
    overhead_jobs: int = 20
    finished_jobs: int = 10_000
    queued_jobs: int = 100
    restarts: int = 3
    bare_baseline: bool = True  # also measure a bare aiohttp handler, for scale
    connection_count: int = 300  # TLS connections held at once, per round
    connection_rounds: int = 5
    resident_jobs: int = 10  # on the real fork, each way
    resident_more: int = 45  # more resident jobs, for the worker's RSS after 50
    stream_clients: int = 1000  # event streams held on one running job
    stalled_clients: int = 300  # event streams that never read their snapshot
    stalled_jobs: int = 150  # queued jobs with long prompts: the snapshot they are sent
    stalled_ping: float = 15.0  # SD_REST_STREAM_PING of that measure (the default)
    listing_pages: int = 200  # pages of each kind timed
    a1111_jobs: int = 40  # one-image jobs each way through /sdapi/v1/txt2img and our API
    a1111_seconds: float = 5.0  # status GETs timed, quiet and while batches are encoded
    cluster_jobs_per_host: int = 6  # throughput: jobs per host, 1, 2 and 4 hosts
    cluster_steps: int = 20  # steps of 50 ms in each of those jobs
    cluster_started: int = 40  # jobs timed from POST to started on a host
    cluster_lag_jobs: int = 5  # jobs whose progress and 1 MB images are timed to their events
    cluster_queued: int = 1000  # jobs queued behind 4 busy hosts for the API node's RSS


FULL = Sizes()
QUICK = Sizes(
    posts=5,
    get_seconds=1,
    get_rounds=1,
    get_connections=8,
    get_threads=1,
    lag_jobs=1,
    lag_iterations=2,
    lag_steps=4,
    overhead_jobs=1,
    finished_jobs=40,
    queued_jobs=4,
    restarts=1,
    bare_baseline=False,
    connection_count=10,
    connection_rounds=1,
    stream_clients=20,
    stalled_clients=10,
    stalled_jobs=60,  # a snapshot beyond what the kernel buffers take
    stalled_ping=1.0,
    listing_pages=10,
    resident_jobs=1,
    resident_more=1,
    a1111_jobs=2,
    a1111_seconds=0.5,
    cluster_jobs_per_host=1,
    cluster_steps=4,
    cluster_started=3,
    cluster_lag_jobs=1,
    cluster_queued=20,
)


@dataclass
class Result:
    """One row of the table. `met` is None when the row has no target or was skipped."""

    measure: str
    figure: str
    target: str = ""
    met: bool | None = None
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "figure": self.figure,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "data": self.data,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """Milliseconds: count, p50, p95, p99, max (the JSON detail of a latency row)."""
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p95_ms": round(percentile(values, 95) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "max_ms": round(max(values) * 1000, 3) if values else math.nan,
    }


# --- certificates -------------------------------------------------------------------------


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (the clients do not verify it)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    make_self_signed_certificate(cert, key, days=2)
    return cert, key


def client_context() -> ssl.SSLContext:
    # Our own throwaway certificate on loopback: verifying it would measure nothing.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the server -----------------------------------------------------------------------------


def simulator_env(
    load_seconds: float, step_seconds: float, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The server's environment (it passes it on to the scripts): fixed simulator times, and
    no SD_SIM_* knob inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_SIM_")}
    env["SD_SIM_LOAD_SECONDS"] = repr(load_seconds)
    env["SD_SIM_STEP_SECONDS"] = repr(step_seconds)
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """`python -m sd_rest --demo` on loopback, as a separate process."""

    output: Path
    cert: tuple[Path, Path]
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.monotonic() just before the process was spawned
    demo: bool = True  # the simulator; False: `args` name a repository and checkpoints

    def command(self) -> list[str]:
        cert, key = self.cert
        return [
            sys.executable,
            "-m",
            "sd_rest",
            *(["--demo"] if self.demo else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--output",
            str(self.output),
            "--cert",
            str(cert),
            "--key",
            str(key),
            *self.args,
        ]

    @property
    def log_path(self) -> Path:
        return self.output.parent / f"server-{self.port}.log"

    def spawn(self) -> ServerProcess:
        if not self.port:
            self.port = free_port()
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            # cwd outside the source tree, so that PYTHONPATH decides which sd_rest runs.
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.output.parent,
            )
        return self

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0, pause: float = 0.002) -> float:
        """Seconds from spawn to the first answered `GET /`: connection attempts every `pause`."""
        deadline = time.monotonic() + timeout
        context = client_context()
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log()}")
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=5)
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    return time.monotonic() - self.started_at
            except OSError:
                time.sleep(pause)
            finally:
                conn.close()
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the server interrupts its scripts and leaves their jobs resumable)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (Linux /proc, else `ps`)."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    out = subprocess.run(
        ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip()) * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc, else `ps`)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        # Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        fields = stat.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    out = subprocess.run(
        ["ps", "-o", "time=", "-p", str(pid)], capture_output=True, text=True, check=True
    )
    seconds = 0.0
    for part in out.stdout.strip().replace("-", ":").split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def wait_idle(pid: int, quiet: float = 0.5, timeout: float = 60.0) -> float:
    """Wait until a process has used under 2% of a core for `quiet` seconds; seconds waited."""
    start = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - start < timeout:
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now - last < 0.02 * quiet:
            break
        last = now
    return time.monotonic() - start


# --- a blocking keep-alive client -------------------------------------------------------------


class Client:
    """One keep-alive HTTPS connection; reconnects when the server closed it."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self.context = client_context()
        self.conn: http.client.HTTPSConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.context, timeout=self.timeout
                )
            try:
                self.conn.request(method, path, body=body, headers=dict(headers or {}))
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
            except BaseException:
                self.close()  # a half-used connection cannot send again
                raise
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> dict[str, Any]:
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return dict(json.loads(body))

    def post_json(self, path: str, doc: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        status, body = self.request(
            "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}
        )
        return status, dict(json.loads(body))

    def submit(self, doc: Mapping[str, Any], endpoint: str = TEXT_TO_IMAGE) -> str:
        """POST a job; its status URL."""
        status, answer = self.post_json(f"/{endpoint}", doc)
        if status != 303:
            raise RuntimeError(f"POST /{endpoint}: {status} {answer}")
        return str(answer["resultUrl"])

    def wait_status(
        self, url: str, statuses: frozenset[str] | set[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.get_json(url)
            if doc["status"] in statuses:
                return doc
            time.sleep(0.005)
        raise RuntimeError(f"{url} did not reach {sorted(statuses)} within {timeout} s")

    def wait_warm(self, timeout: float = 60.0) -> None:
        """Until no resident worker is warming up (GET /'s `workers`): a measure of jobs starts
        where a user's first job would after the server had warmed up. The warm-up is a script
        run too, and what it writes to the simulator's event log would be taken for a job's."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self.get_json("/")["workers"]
            if all(worker["state"] == "idle" for worker in workers):
                return
            time.sleep(0.01)
        raise RuntimeError(f"the workers did not warm up within {timeout} s")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --- the machine ------------------------------------------------------------------------------


def machine_description() -> dict[str, str]:
    import aiohttp

    return {
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _memory(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "aiohttp-sse": _version("aiohttp-sse"),
        "openssl": ssl.OPENSSL_VERSION,
        "wrk": wrk_version() or "not installed",
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    try:
        out = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        )
        return out.stdout.strip() or platform.processor()
    except OSError:
        return platform.processor()


def _memory() -> str:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kib = int(meminfo.read_text().split()[1])
        return f"{kib / 1024 / 1024:.1f} GiB"
    try:
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
        return f"{int(out.stdout) / 1024**3:.1f} GiB"
    except (OSError, ValueError):
        return "unknown"


def wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    # wrk prints its version with the usage text and exits 1 when given no URL.
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else "wrk"
