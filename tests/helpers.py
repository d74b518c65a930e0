"""Test helpers: a real server process over real HTTPS, and a small blocking client."""

from __future__ import annotations

import http.client
import io
import json
import os
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

    def command(self) -> list[str]:
        cert, key, _ = self.certs
        base = [sys.executable, "-m", "sd_rest", "--host", "127.0.0.1", "--port", str(self.port)]
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
