"""Helpers for the in-process tests of the core: settings on the simulator, event recording,
waiting inside an event loop."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sd_rest.endpoints import ENDPOINTS
from sd_rest.fields import Params
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
