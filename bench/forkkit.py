"""The real fork's kit (tiny random models that run the fork's unmodified scripts on a CPU),
built once per kit and cache folder: for the `resident` measure and the tests' real_fork group.

The kit's prepare.sh re-extracts the fork and remakes the models on every run, so running it
while another process uses the kit (a second pytest-xdist process, a benchmark) pulls files
from under that process's scripts. One process builds under a lock; a stamp of the kit's
fingerprint tells the others, and later runs, that the build is there.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from pathlib import Path

KIT_ENV = "SD_REST_REAL_FORK"  # the folder with the kit's prepare.sh
CACHE_ENV = "SD_REST_REAL_FORK_CACHE"  # where it is built
DEFAULT_CACHE = Path.home() / ".cache" / "sd-rest" / "real-fork"
STAMP = ".sd-rest-built"
LOCK = ".sd-rest-build.lock"


def kit_folder() -> Path | None:
    """The kit named by SD_REST_REAL_FORK, or None."""
    value = os.environ.get(KIT_ENV, "").strip()
    return Path(value).resolve() if value else None


def cache_folder() -> Path:
    return Path(os.environ.get(CACHE_ENV, "") or DEFAULT_CACHE)


def fingerprint(kit: Path) -> str:
    """What the kit would build: its files' names, sizes and contents (the tarball by size and
    time; hashing it would cost more than the check saves)."""
    digest = hashlib.sha256()
    for path in sorted(kit.iterdir()):
        if not path.is_file():
            continue
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0".encode())
        if path.suffix in {".sh", ".py", ".yaml"}:
            digest.update(path.read_bytes())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def build(kit: Path, root: Path) -> Path:
    """Run `kit`/prepare.sh into `root` unless this kit is built there already; returns the
    fork's repository folder. RuntimeError with prepare.sh's last words when it fails."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / STAMP
    wanted = fingerprint(kit)
    repository = root / "stable-diffusion"
    with open(root / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = stamp.read_text() if stamp.exists() else ""
        if built != wanted or not (repository / "venv" / "bin" / "python").exists():
            stamp.unlink(missing_ok=True)
            result = subprocess.run(
                ["bash", str(kit / "prepare.sh"), str(root)],
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"prepare.sh failed ({result.returncode}):\n{result.stderr[-4000:]}"
                )
            stamp.write_text(wanted)
    return repository
