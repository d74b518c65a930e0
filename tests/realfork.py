"""The real fork's kit for the `real_fork` test group: the fork's unmodified scripts with tiny
random models, built once per machine by the kit's own `prepare.sh`.

The kit is not part of this project. Point `SD_REST_REAL_FORK` at the folder holding its
`prepare.sh` to run the group (CI does when it has one); without it the group is skipped.
`SD_REST_REAL_FORK_CACHE` chooses where it is built (default `~/.cache/sd-rest/real-fork`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

KIT_ENV = "SD_REST_REAL_FORK"
CACHE_ENV = "SD_REST_REAL_FORK_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "sd-rest" / "real-fork"


@dataclass(frozen=True)
class RealFork:
    kit: Path  # the folder with prepare.sh (read-only)
    root: Path  # where prepare.sh built it
    repository: Path  # the fork's code, with `venv` inside
    python: Path
    text_to_image_model: Path
    inpaint_image_model: Path
    test_inputs: Path

    def server_args(self) -> list[str]:
        return [
            "--repository", str(self.repository),
            "--python", str(self.python),
            "--text-to-image-model", str(self.text_to_image_model),
            "--inpaint-image-model", str(self.inpaint_image_model),
        ]  # fmt: skip


def kit_folder() -> Path | None:
    value = os.environ.get(KIT_ENV, "").strip()
    return Path(value).resolve() if value else None


def skip_reason() -> str:
    return f"the real fork's kit is not available: set {KIT_ENV} to the folder with its prepare.sh"


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


def build(kit: Path) -> RealFork:
    """Run the kit's prepare.sh once per kit and cache folder, and describe the result.

    prepare.sh re-extracts the fork and remakes the models on every run, so running it while
    another test process (pytest-xdist) uses the kit pulls files from under that process's
    scripts: one process builds under a lock, and a stamp of the kit's fingerprint tells the
    others (and later sessions) that the build is there.
    """
    root = Path(os.environ.get(CACHE_ENV, "") or DEFAULT_CACHE)
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / ".sd-rest-tests-built"
    wanted = fingerprint(kit)
    with open(root / ".sd-rest-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = stamp.read_text() if stamp.exists() else ""
        python = root / "stable-diffusion" / "venv" / "bin" / "python"
        if built != wanted or not python.exists():
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
    repository = root / "stable-diffusion"
    return RealFork(
        kit=kit,
        root=root,
        repository=repository,
        python=repository / "venv" / "bin" / "python",
        text_to_image_model=root / "models" / "text-to-image.ckpt",
        inpaint_image_model=root / "models" / "inpaint-image.ckpt",
        test_inputs=root / "models" / "test-inputs",
    )
