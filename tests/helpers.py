"""Test helpers: a real server process over real HTTPS, and a small blocking client."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR = ROOT / "sd_rest" / "simulator"
DEMO_MODELS = SIMULATOR / "models" / "demo"

# Fast simulator defaults for tests; a test overrides them through `env`.
FAST_SIMULATOR = {
    "SD_SIM_LOAD_SECONDS": "0.05",
    "SD_SIM_STEP_SECONDS": "0.01",
}


# `python -m sd_rest` with sd_rest's loggers at DEBUG: the command line only sets the root
# logger's level (INFO), which a lower level set on "sd_rest" beforehand overrides.
DEBUG_LOG_START = (
    "import logging, runpy; logging.getLogger('sd_rest').setLevel(logging.DEBUG); "
    "runpy.run_module('sd_rest', run_name='__main__', alter_sys=True)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def multipart(
    fields: Mapping[str, str] | list[tuple[str, str]] | None = None,
    files: Mapping[str, bytes] | None = None,
    content_types: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    items = list(fields.items()) if isinstance(fields, Mapping) else list(fields or [])
    for name, value in items:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(str(value).encode() + b"\r\n")
    for name, data in (files or {}).items():
        ctype = (content_types or {}).get(name, "image/png")
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.png"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def mask_bytes(width: int, height: int) -> bytes:
    image = Image.new("L", (width, height), 0)
    image.paste(255, (width // 4, height // 4, width * 3 // 4, height * 3 // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Server:
    """`python -m sd_rest` as a real process, against the simulator."""

    output: Path
    certs: tuple[str, str, str]  # cert, key, CA bundle
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    demo: bool = True
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    debug_log: bool = False  # log sd_rest's DEBUG records too (what it saw and let go quietly)

    @property
    def runner(self) -> str:
        """How this server runs jobs: "resident" (the default) or "process"."""
        args = self.args
        return args[args.index("--runner") + 1] if "--runner" in args else "resident"

    def command(self) -> list[str]:
        cert, key, _ = self.certs
        start = ["-c", DEBUG_LOG_START] if self.debug_log else ["-m", "sd_rest"]
        base = [sys.executable, *start, "--host", "127.0.0.1", "--port", str(self.port)]
        base += ["--output", str(self.output), "--cert", cert, "--key", key]
        if self.demo:
            base.append("--demo")
        return base + self.args

    def start(self, wait: bool = True) -> Server:
        if not self.port:
            self.port = free_port()
        env = {**os.environ, **FAST_SIMULATOR, **self.env}
        self.log_path = self.output.parent / f"server-{self.port}-{time.time_ns()}.log"
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.output.parent,
            )
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def assert_serving(self, since: int = 0) -> None:
        """The server still runs, answers `GET /`, and has logged no error since `since` (a
        `len(self.log())` taken earlier): what a request it refused must leave behind."""
        assert self.process is not None
        assert self.process.poll() is None, f"the server exited:\n{self.log()}"
        assert self.get("/").status == 200
        logged = self.log()[since:]
        # Every failure inside the server is logged at ERROR (ours, aiohttp's and asyncio's).
        assert not re.search(r" (ERROR|CRITICAL) |Traceback", logged), logged

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.get("/").status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def end(self, timeout: float = 10.0) -> None:
        """End the server if it still runs: SIGTERM first, SIGKILL only if it has not stopped
        after `timeout`. A server stopped by SIGTERM writes its coverage data as it exits (see
        scripts/test.sh); one killed outright loses it."""
        end_all([self], timeout)

    # --- client ------------------------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.certs[2])

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Response:
        conn = http.client.HTTPSConnection(
            "localhost", self.port, context=self.context(), timeout=timeout
        )
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Response(resp.status, {k: v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.request("GET", path, headers=headers)

    def post_form(
        self,
        endpoint: str,
        fields: Mapping[str, str] | list[tuple[str, str]] | None = None,
        files: Mapping[str, bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        body, ctype = multipart(fields, files)
        return self.request(
            "POST", f"/{endpoint}", body, {"Content-Type": ctype, **(headers or {})}
        )

    def post_json(self, endpoint: str, doc: Any) -> Response:
        return self.request(
            "POST", f"/{endpoint}", json.dumps(doc).encode(), {"Content-Type": "application/json"}
        )

    def wait_status(self, url: str, statuses: set[str], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        doc: dict[str, Any] = {}
        while time.monotonic() < deadline:
            doc = self.get(url).json()
            if doc["status"] in statuses:
                return doc
            time.sleep(0.02)
        raise AssertionError(f"{url} never reached {statuses}; last {doc}\n{self.log()}")

    def poll(self, url: str, until: set[str], timeout: float = 30.0) -> Iterator[dict[str, Any]]:
        """Every status document seen until one of `until` (included)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.get(url).json()
            yield doc
            if doc["status"] in until:
                return
            time.sleep(0.01)
        raise AssertionError(f"{url} never reached {until}\n{self.log()}")


def end_all(servers: list[Server], timeout: float = 10.0) -> None:
    """Server.end for several servers at once: all are signalled before any is waited for."""
    running = [s.process for s in servers if s.process is not None and s.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# --- restarts, cancels and shutdowns: the disk, the scripts' processes, the seed rule -------

SEED_LIMIT = 2**32


def wait_until(check: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll `check()` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines log another process is still appending to."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def job_folder(output: Path, url: str) -> Path:
    """`/text-to-image/<id>` → `<output>/text-to-image/<id>`."""
    return output.joinpath(*url.strip("/").split("/"))


def read_sidecar(output: Path, url: str) -> dict[str, Any]:
    return json.loads((job_folder(output, url) / "job.json").read_bytes())


def script_pids(argv_log: Path, url: str | None = None) -> list[int]:
    """Pids of the script runs SD_SIM_ARGV_LOG recorded (those of job `url` only, if given)."""
    job_id = url.rsplit("/", 1)[1] if url else ""
    return [
        run["pid"]
        for run in read_jsonl(argv_log)
        if not job_id or any(job_id in arg for arg in run["argv"])
    ]


def process_running(pid: int) -> bool:
    """Whether `pid` is alive; a zombie (ended, not yet reaped by its new parent) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    wait_until(
        lambda: not any(process_running(pid) for pid in pids),
        f"script processes {pids} to end",
        timeout,
    )


def wait_script_ended(server: Server, pids: list[int], timeout: float = 10.0) -> None:
    """The job's script has ended: its process is gone (one process per job), or its resident
    worker is idle again, ready for the next job (the worker lives on)."""
    if server.runner == "process":
        wait_gone(pids, timeout)
        return
    wait_until(
        lambda: all(w["state"] == "idle" for w in server.get("/").json()["workers"]),
        "the resident worker to be idle again",
        timeout,
    )


def reproduce_txt2img(
    params: Mapping[str, str], seed: int, count: int, workdir: Path
) -> list[bytes]:
    """The first `count` PNGs of the simulator's txt2img run with `params` and `--seed seed`,
    run directly (not through the server): what the README promises image records mean."""
    outdir = workdir / f"reproduce-{seed}-{count}-{time.time_ns()}"
    argv = [
        sys.executable,
        str(SIMULATOR / "scripts" / "txt2img.py"),
        f"--prompt={params['prompt']}",
        f"--outdir={outdir}",
        "--skip_grid",
        f"--ddim_steps={params.get('steps', '8')}",
        f"--n_iter={count}",
        "--n_samples=1",
        f"--seed={seed}",
        f"--H={params.get('height', '512')}",
        f"--W={params.get('width', '512')}",
        f"--ckpt={DEMO_MODELS / 'text-to-image.ckpt'}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_SIM_")}
    env.update({"SD_SIM_LOAD_SECONDS": "0", "SD_SIM_STEP_SECONDS": "0"})
    subprocess.run(argv, cwd=SIMULATOR, env=env, check=True, capture_output=True, timeout=60)
    return [(outdir / "samples" / f"{k:05}.png").read_bytes() for k in range(count)]


def check_finished_job(
    server: Server, url: str, params: Mapping[str, str], workdir: Path | None = None
) -> list[bytes]:
    """A COMPLETE text-to-image job with images 1..N: each served, a whole PNG, the file the
    sidecar records, none a duplicate, each seeded by the README's rule (`seed + done`,
    position in its run), and, given `workdir`, made again byte for byte by running the
    script with the recorded seed. Returns the PNGs' bytes."""
    import hashlib  # here: this block of helpers.py is appended to, never edited above

    from pngparts import without_text

    doc = server.get(url).json()
    assert doc["status"] == "COMPLETE", doc
    total = int(params.get("iterations", "1")) * int(params.get("batchSize", "1"))
    assert doc["imageUrls"] == [f"{url}/{n}.png" for n in range(1, total + 1)], doc
    sidecar = read_sidecar(server.output, url)
    assert sidecar["status"] == "COMPLETE"
    assert [image["n"] for image in sidecar["images"]] == list(range(1, total + 1))
    pngs: list[bytes] = []
    for record, image_url in zip(sidecar["images"], doc["imageUrls"], strict=True):
        resp = server.get(image_url)
        assert resp.status == 200, image_url
        with Image.open(io.BytesIO(resp.body)) as image:
            image.load()
        assert hashlib.sha256(resp.body).hexdigest() == record["sha256"]
        done_before_run = record["n"] - record["position"]
        assert record["seed"] == (int(params["seed"]) + done_before_run) % SEED_LIMIT, record
        pngs.append(resp.body)
    assert len(set(pngs)) == total, "duplicate images"
    leftovers = sorted(p.name for p in job_folder(server.output, url).iterdir())
    assert leftovers == sorted(
        ["job.json", "job.log", "inputs", *(f"{n}.png" for n in range(1, total + 1))]
    )
    if workdir is not None:
        by_seed: dict[int, list[dict[str, Any]]] = {}
        for record in sidecar["images"]:
            by_seed.setdefault(record["seed"], []).append(record)
        for seed, records in by_seed.items():
            made = reproduce_txt2img(params, seed, max(r["position"] for r in records), workdir)
            for record in records:
                # The script's bytes exactly, plus sd-rest's two text chunks (test_labels.py).
                served = without_text(pngs[record["n"] - 1], {"parameters", "sd-rest"})
                assert served == made[record["position"] - 1], record
    return pngs


# --- raw HTTP, for requests http.client refuses to send -----------------------------------


def tls_socket(server: Server, timeout: float = 10.0) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return server.context().wrap_socket(sock, server_hostname="localhost")


def parse_response(data: bytes) -> Response:
    """One HTTP/1.x response with a Content-Length body (what the server always sends)."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    length = int(headers.get("Content-Length", len(rest)))
    return Response(status, headers, rest[:length])


def raw_request(server: Server, data: bytes, timeout: float = 10.0) -> Response:
    """Send `data` as is on a new TLS connection; read the one response."""
    with tls_socket(server, timeout) as sock:
        sock.sendall(data)
        received = read_response(sock)
    if not received:
        raise AssertionError(f"no response to {data[:80]!r}")
    return parse_response(received)


def read_response(sock: ssl.SSLSocket, received: bytes = b"") -> bytes:
    """Bytes until one whole response has arrived or the server closed the connection."""
    try:
        while not _complete(received) and (chunk := sock.recv(65536)):
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return received


def _complete(data: bytes) -> bool:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return False


# --- plain HTTP (--http-port), as AUTOMATIC1111's clients speak it -------------------------


def http_request(
    port: int,
    method: str,
    path: str,
    doc: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Response:
    """One request over plain HTTP to 127.0.0.1:`port`, a JSON body when `doc` is given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = None if doc is None else json.dumps(doc).encode()
    sent = dict(headers or {})
    if body is not None:
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return Response(resp.status, {k: v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def start_with_http(make_server: Any, args: list[str] | None = None, **kwargs: Any) -> Server:
    """A demo server also serving plain HTTP (--http-port); its `http_port` attribute."""
    port = free_port()
    server = make_server(args=[*(args or []), "--http-port", str(port)], **kwargs)
    server.http_port = port  # type: ignore[attr-defined]
    return server
