"""The worker folder (SD_REST_WORKER_DIR, default ~/.cache/sd-rest/worker): the checkpoints'
hash cache, and one scratch folder per worker process (`<dir>/<pid>/`) holding its jobs while
they run; cleared at its start and exit. A folder left by a process that is gone (killed) is
removed at the next start."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Final

WORKER_DIR_ENV: Final = "SD_REST_WORKER_DIR"


def worker_dir() -> Path:
    given = os.environ.get(WORKER_DIR_ENV, "").strip()
    if given:
        return Path(given).absolute()
    return Path.home() / ".cache" / "sd-rest" / "worker"


def scratch_folder(root: Path, pid: int) -> Path:
    """This process's empty scratch folder; the leftovers of dead processes removed. Raises
    OSError when the folder cannot be made."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(root):
        if not (entry.name.isdigit() and entry.is_dir(follow_symlinks=False)):
            continue
        if int(entry.name) == pid or not _alive(int(entry.name)):
            shutil.rmtree(entry.path, ignore_errors=True)
    folder = root / str(pid)
    folder.mkdir()
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's: not ours to judge
    return True
