"""What a checkpoint file is, read from its bytes without loading it (no torch here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

# The checksum of the checkpoints setup.sh downloads, where it is published, by file size.
KNOWN_CHECKPOINTS = {
    4_265_380_512: (
        "sd-v1-4.ckpt",
        "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556",
    ),
}
# No model the scripts can run fits in less; a full Stable Diffusion v1 one is 2-8 GB.
MIN_CHECKPOINT_BYTES = 1024**2
FULL_CHECKPOINT_BYTES = 10**9


def checkpoint_format(head: bytes) -> str:
    """What the first bytes of a checkpoint file say it is."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    stripped = head.lstrip()
    if stripped.startswith(b"<"):
        return "html"
    if stripped.startswith(b"version https://git-lfs"):
        return "git-lfs"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # 8-byte little-endian header length, then a JSON header
    return "unknown"


def has_zip_end_record(path: Path, size: int) -> bool:
    """Whether the zip's end-of-central-directory record is in its tail. A download that
    stopped early has none: the record is the last thing a zip writer writes."""
    tail = min(size, 22 + 0xFFFF)  # the record plus the longest comment
    with path.open("rb") as file:
        file.seek(size - tail)
        return b"PK\x05\x06" in file.read(tail)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 * 1024**2):
            digest.update(chunk)
    return digest.hexdigest()


def expected_sha256(path: Path, size: int) -> tuple[str, str] | None:
    """(checksum, where it comes from): the `<checkpoint>.sha256` setup.sh writes after
    checking a download, else the published one of a known checkpoint of this size."""
    sidecar = Path(f"{path}.sha256")
    if sidecar.is_file():
        words = sidecar.read_text(encoding="utf-8", errors="replace").split()
        if words:
            return words[0].lower(), sidecar.name
    if size in KNOWN_CHECKPOINTS:
        name, sha = KNOWN_CHECKPOINTS[size]
        return sha, f"the published {name}"
    return None
