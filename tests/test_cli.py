"""The command line: help, version, defaults and each start-up error, as real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sd_rest import __version__

from helpers import DEMO_MODELS, SIMULATOR

ORIGINAL_OPTIONS = [
    (
        "--text-to-image-model",
        "Path to the text-to-image model checkpoint",
        "./models/text-to-image.ckpt",
    ),
    (
        "--inpaint-image-model",
        "Path to the inpaint image model checkpoint",
        "./models/inpaint-image.ckpt",
    ),
    ("--concurrency", "Number of concurrent image generation tasks", "1"),
    ("--output", "Directory to output generated images", "./output"),
    ("--cert", "Path to the SSL certicate", "./cert.pem"),
    ("--key", "Path to the SSL certicate key", "./key.pem"),
    (
        "--delete-incomplete",
        "Delete all incomplete image generation tasks before starting the server",
        "false",
    ),
    ("--port", "Port to serve the REST API", "8888"),
    ("--repository", "Path to the Stable Diffusion repository", "./stable-diffusion"),
]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sd_rest", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_keeps_the_original_wording(flag: str) -> None:
    result = run(flag)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "    $ stable-diffusion-rest-api [options]" in lines
    for option, text, default in ORIGINAL_OPTIONS:
        row = next(line for line in lines if line.strip().startswith(option + " "))
        assert row.split(None, 1)[1] == f"{text}  (default {default})"
    for extra in ("--host", "--python", "--demo", "--api-key", "-v, --version", "-h, --help"):
        assert any(line.strip().startswith(extra) for line in lines), extra
    row = next(line for line in lines if line.strip().startswith("--check "))
    assert row.split(None, 1)[1] == (
        "Check that everything the server needs is in place, then exit  (default false)"
    )


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version_is_the_package_version(flag: str) -> None:
    result = run(flag)
    assert result.returncode == 0
    assert result.stdout.strip() == __version__
    assert __version__ not in ("0.0.0", "0.0.0+unknown")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "stable-diffusion-rest-api"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == __version__


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    return result.stderr


def test_missing_certificate_names_mkcert(tmp_path: Path) -> None:
    result = run("--repository", str(SIMULATOR), "--python", sys.executable, cwd=tmp_path)
    err = error_line(result)
    assert "SSL certificate ./cert.pem not found" in err
    assert "mkcert -cert-file cert.pem -key-file key.pem 0.0.0.0" in err


def test_unreadable_certificate(tmp_path: Path, certs: tuple[str, str, str]) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    result = run(
        "--repository",
        str(SIMULATOR),
        "--python",
        sys.executable,
        "--cert",
        str(bad),
        "--key",
        certs[1],
        cwd=tmp_path,
    )
    assert "cannot use" in error_line(result)


def test_default_repository_missing(tmp_path: Path, certs: tuple[str, str, str]) -> None:
    result = run("--cert", certs[0], "--key", certs[1], cwd=tmp_path)
    assert "Stable Diffusion repository not found at stable-diffusion" in error_line(result)


def test_repository_without_scripts(tmp_path: Path, certs: tuple[str, str, str]) -> None:
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    (tmp_path / "repo" / "scripts" / "txt2img.py").write_text("")
    result = run("--repository", str(tmp_path / "repo"), "--cert", certs[0], "--key", certs[1])
    assert "scripts/img2img.py is missing" in error_line(result)


def test_vendored_repository_is_the_fallback(tmp_path: Path, certs: tuple[str, str, str]) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "stable-diffusion").symlink_to(SIMULATOR)
    result = run("--cert", certs[0], "--key", certs[1], cwd=tmp_path)
    # The repository is found; what is missing now is its venv.
    assert "vendor/stable-diffusion/venv/bin/python is missing" in error_line(result)


def test_missing_interpreter(tmp_path: Path, certs: tuple[str, str, str]) -> None:
    result = run(
        "--repository",
        str(SIMULATOR),
        "--python",
        str(tmp_path / "nope"),
        "--cert",
        certs[0],
        "--key",
        certs[1],
    )
    assert "interpreter" in error_line(result)


def test_port_in_use(tmp_path: Path, certs: tuple[str, str, str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run(
            "--demo",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--output",
            str(tmp_path / "o"),
            "--cert",
            certs[0],
            "--key",
            certs[1],
        )
    assert f"cannot listen on 127.0.0.1:{port}" in error_line(result)


def test_demo_makes_a_throwaway_certificate(make_server, tmp_path: Path) -> None:
    server = make_server(start=False)
    server.certs = (str(tmp_path / "no-cert.pem"), str(tmp_path / "no-key.pem"), "")
    server.start(wait=False)
    cert = server.output / "demo-cert.pem"
    for _ in range(200):
        if "serving https://" in server.log():
            break
        import time

        time.sleep(0.05)
    assert cert.is_file() and (server.output / "demo-key.pem").is_file()
    assert "self-signed certificate" in server.log()
    assert DEMO_MODELS.is_dir()
