"""Helpers for the in-process tests of the core: settings on the simulator, stand-in scripts
and their repository, event recording, waiting inside an event loop."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sd_rest.endpoints import ENDPOINTS
from sd_rest.fields import Params
from sd_rest.jobs.manager import JobManager
from sd_rest.state.events import JobEvent, JobEvents
from sd_rest.state.jobs import Job

from helpers import DEMO_MODELS, SIMULATOR


def settings(output: Path, **changes: Any) -> Any:
    from sd_rest.settings import Settings

    base = Settings(
        repository=SIMULATOR,
        python=Path(sys.executable),
        text_to_image_model=DEMO_MODELS / "text-to-image.ckpt",
        inpaint_image_model=DEMO_MODELS / "inpaint-image.ckpt",
        output=output,
        min_free_space=0,
        shutdown_grace=1.0,
    )
    return replace(base, **changes)


def text_params(**changes: Any) -> Params:
    params: dict[str, Any] = {**ENDPOINTS["text-to-image"].defaults, "prompt": "a cat"}
    params.update(width=256, height=256, steps=4)
    params.update(changes)
    return params


# Writes the image the job asks for, as txt2img does: <outdir>/samples/00000.png.
WRITES_AN_IMAGE = """\
    import os, sys, zlib, struct
    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--outdir="))
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\\0\\0")) + chunk(b"IEND", b""))
    with open(os.path.join(out, "samples", "00000.png"), "wb") as f:
        f.write(png)
"""
# Busy in Python for 3 s (past a 1 s --worker-timeout), then WRITES_AN_IMAGE: the heartbeat
# comes from a thread of its own, not from the script's progress.
BUSY_THEN_WRITES = (
    """\
    import time
    end = time.monotonic() + 3
    while time.monotonic() < end:
        sum(range(1000))
"""
    + WRITES_AN_IMAGE
)


def stand_in_repository(root: Path, script: str) -> Path:
    """`<root>/repo`, whose three scripts are all `script` (dedented)."""
    scripts = root / "repo" / "scripts"
    scripts.mkdir(parents=True)
    for name in ("txt2img.py", "img2img.py", "inpaint.py"):
        (scripts / name).write_text(textwrap.dedent(script))
    return root / "repo"


def started_pids(manager: JobManager) -> dict[str, int | None]:
    """Job id -> the pid it ran under (its script's, or its worker's), as it started."""
    pids: dict[str, int | None] = {}
    manager.events.listen(
        lambda e: pids.setdefault(e.job.id, e.job.pid) if e.kind == "started" else None
    )
    return pids


async def until(check: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


class Recorder:
    """Every event of `events`, in order."""

    def __init__(self, events: JobEvents) -> None:
        self.seen: list[JobEvent] = []
        self.stop = events.listen(self.seen.append)

    def kinds(self, job: Job) -> list[str]:
        return [e.kind for e in self.seen if e.job is job]

    def without_progress(self, job: Job) -> list[str]:
        return [kind for kind in self.kinds(job) if kind != "progress"]
