"""Schemathesis, run from the document the demo server serves against that server over HTTPS
(verified with the test CA): no server error, no response the document does not describe
(status, content type, headers, body, the events of a stream), no crash; requests that break
the document are refused. Bounded (examples per operation, stateful steps: schemathesis.toml)
to fit CI. `GET /events` is left out: it is a stream that never ends (test_openapi.py checks
its real events against the document). So are AUTOMATIC1111's txt2img and img2img: each waits
for its job to end, so every example would run a job to its last image (their refusals and
answers are checked in test_a1111_txt2img.py and test_a1111_img2img.py); every other route of
that dialect is fuzzed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import Server, wait_until

CONFIG = Path(__file__).with_name("schemathesis.toml")
KEY = "schemathesis-k3y"


def schemathesis(server: Server, *args: str, timeout: float = 240) -> tuple[int, str]:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "--no-color",
        "run", f"https://localhost:{server.port}/openapi.json",
        "--tls-verify", server.certs[2],
        "--exclude-path", "/events",
        "--exclude-path-regex", "^/sdapi/v1/(txt2img|img2img)$",
        "--seed", "1",  # the same cases on every run
        "--generation-database", "none",
        "--request-timeout", "10",
        "--max-redirects", "0",  # a POST's 303 is the answer to check, not what follows it
        "--workers", "1",
        *args,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=server.output.parent
    )
    return done.returncode, done.stdout + done.stderr


def passed(output: str) -> bool:
    summary = output.strip().splitlines()[-1]
    return "failure" not in summary and "error" not in summary


def test_schemathesis_finds_nothing_against_the_demo_server(make_server) -> None:
    # Long steps: the jobs it posts wait in the queue instead of drawing images on the CPU.
    server = make_server(env={"SD_SIM_STEP_SECONDS": "5"})
    started = time.monotonic()
    status, output = schemathesis(server, "--max-examples", "6")
    print(output[-3000:], f"\n(schemathesis: {time.monotonic() - started:.1f} s)")
    assert status == 0 and passed(output), output[-20000:]
    assert "Stateful" in output and "passed" in output
    server.assert_serving()


def test_schemathesis_with_the_api_key(make_server) -> None:
    """With a key every operation is tried with it, and without it (ignored_auth)."""
    server = make_server(args=["--api-key", KEY], env={"SD_SIM_STEP_SECONDS": "5"}, start=False)
    server.start(wait=False)
    wait_until(lambda: _status(server) == 401, "the keyed server to answer")
    status, output = schemathesis(
        server,
        "--header", f"Authorization: Bearer {KEY}",
        "--max-examples", "5",
        "--phases", "coverage",
    )  # fmt: skip
    assert status == 0 and passed(output), output[-20000:]


def _status(server: Server) -> int | None:
    try:
        return server.get("/").status
    except OSError:
        return None


@pytest.mark.parametrize("module", ["schemathesis", "openapi_spec_validator"])
def test_the_test_tools_are_installed(module: str) -> None:
    # The `test` extra of pyproject.toml brings them; a missing one must fail, not skip.
    __import__(module)
