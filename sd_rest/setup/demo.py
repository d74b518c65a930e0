"""Demo mode: the bundled simulator instead of the fork, placeholder checkpoints, and a
throwaway certificate when the user has none."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sd_rest.setup.certinfo import CertificateError, pem_certificates, validity

SIMULATOR = Path(__file__).parent.parent / "simulator"
CERT_NAME, KEY_NAME = "demo-cert.pem", "demo-key.pem"


def demo_checkpoint(model: str) -> Path:
    """The simulator's placeholder checkpoint for "text-to-image" or "inpaint-image"."""
    return SIMULATOR / "models" / "demo" / f"{model}.ckpt"


def make_self_signed_certificate(cert: Path, key: Path, days: int = 30) -> None:
    """A self-signed certificate for localhost/127.0.0.1 made with the `openssl` command.

    Raises OSError (no openssl) or subprocess.CalledProcessError.
    """
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-days", str(days), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


def demo_certificate(output: Path) -> tuple[Path, Path, bool]:
    """(cert, key, made now): the throwaway pair in the output folder, made if missing or
    no longer valid (it lasts 30 days, and start-up refuses an expired certificate)."""
    cert, key = output / CERT_NAME, output / KEY_NAME
    if cert.is_file() and key.is_file() and _still_valid(cert):
        return cert, key, False
    output.mkdir(parents=True, exist_ok=True)
    make_self_signed_certificate(cert, key)
    return cert, key, True


def _still_valid(cert: Path) -> bool:
    try:
        not_before, not_after = validity(pem_certificates(cert.read_bytes())[0])
    except (OSError, IndexError, CertificateError):
        return False
    now = datetime.now(timezone.utc)
    return not_before <= now < not_after - timedelta(days=1)
