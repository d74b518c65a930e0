"""A worker's warm-up: before its first job, a new worker runs the text-to-image script once
(one image, one step, the default size) into a folder of its own, thrown away after. The run
imports what the scripts import, reads the checkpoint, builds the model and loads the safety
checker, which the worker then keeps, so that the first job runs as fast as the second.

The warm-up changes no job's images: the worker keeps a cached model's generator exactly where
a fresh build would leave it, whatever ran before in the worker (worker_driver/__init__.py), and
the warm-up is just a run before.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

from sd_rest.endpoints import ENDPOINTS, TEXT_TO_IMAGE
from sd_rest.runs.workers import Finished, Worker
from sd_rest.scripts import plan_run
from sd_rest.settings import Model, Settings

log = logging.getLogger(__name__)

WARM_UP_JOB: Final = "warm-up"
TAIL: Final = 2000  # bytes of a failed warm-up's output logged


def warm_up_params() -> dict[str, Any]:
    """The endpoint's defaults (its size: the shapes a default job has), at one step."""
    return {**ENDPOINTS[TEXT_TO_IMAGE].defaults, "prompt": "a warm-up", "steps": 1}


async def warm_up(worker: Worker, settings: Settings) -> Finished:
    """Run the warm-up in `worker` (not counted as one of its jobs)."""
    endpoint = ENDPOINTS[TEXT_TO_IMAGE]
    checkpoint = settings.checkpoint(Model.TEXT_TO_IMAGE)
    params = warm_up_params()
    plan = plan_run(params, 1, 0)
    root = Path(tempfile.mkdtemp(prefix="sd-rest-warm-up-"))
    output = bytearray()

    def keep_tail(data: bytes) -> None:
        output.extend(data)
        del output[:-TAIL]

    try:
        folders = endpoint.make_run_folders(root / "run", settings.repository, checkpoint)
        finished = await worker.run(
            WARM_UP_JOB,
            settings.repository / endpoint.script,
            endpoint.arguments(params, plan, folders, checkpoint, root),
            folders.cwd,
            endpoint.start_seed(plan),
            keep_tail,
            lambda: None,
            counted=False,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if finished.outcome != "ok":
        log.warning(
            "worker %d: its warm-up failed (%s); the next job loads the model itself:\n%s",
            worker.number,
            finished.error or finished.ended.describe(),
            output.decode(errors="replace"),
        )
    return finished
