"""What a remote run reads from this node's disk and writes to it besides the images: the
job's input files for its message, the tail of the worker's script output in the job's log,
and the outcome a worker host's end makes (remote_runner.py)."""

from __future__ import annotations

import asyncio
import logging

from sd_rest.cluster.entries import End
from sd_rest.cluster.message import Checkpoint, JobMessage
from sd_rest.runs.seam import Outcome, OutcomeKind
from sd_rest.runs.workspace import RunLog
from sd_rest.state.files import read_plain
from sd_rest.state.jobs import Job
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)


class InputsUnreadable(Exception):
    """The job's input files could not be read from its folder: it fails saying so."""


async def message_for(store: JobStore, job: Job, checkpoint: Checkpoint) -> JobMessage:
    """The job's message: ids, parameters, checkpoint and the input files' bytes."""
    folder = store.layout.inputs_dir(job.endpoint, job.id)
    inputs = {}
    for field, name in job.inputs.items():
        try:
            inputs[field] = await asyncio.to_thread(read_plain, folder / name)
        except OSError as exc:
            raise InputsUnreadable(
                f"the job's input files could not be read ({exc.strerror or exc}); POST it "
                "again to restore them"
            ) from None
    return JobMessage(job.endpoint, job.id, job.params, checkpoint, inputs, dict(job.uploads))


def append_log(store: JobStore, job: Job, entry: End) -> None:
    """The tail of the worker's script output, in the job's log, as a local run's output
    (never through a link: RunLog)."""
    text = f"\n=== sd-rest remote run ({entry.outcome}), the end of its log:\n{entry.log_tail}"

    def fault(exc: OSError, doing: str) -> None:
        log.warning("job %s/%s: %s failed: %s", job.endpoint, job.id, doing, exc)

    try:
        run_log = RunLog(store.layout.log(job.endpoint, job.id), fault)
    except OSError as exc:
        fault(exc, "opening the job's log")
        return
    try:
        run_log.write(text.encode())
    finally:
        run_log.close()


def final_outcome(entry: End, kept: int, total: int) -> Outcome:
    """The outcome of a run whose worker host ended it (not `stopped`), with `kept` of the
    job's `total` images kept here."""
    if kept >= total:
        return Outcome(OutcomeKind.COMPLETE)
    if entry.outcome == "canceled":
        return Outcome(OutcomeKind.CANCELED)
    if entry.outcome == "complete":
        return Outcome.failed(f"its worker host ended with {kept} of {total} images")
    return Outcome.failed(entry.error or "the job failed on its worker host")
