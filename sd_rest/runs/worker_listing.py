"""What `GET /` shows of the resident workers (worker_pool.py): each one's state, how one that
ended did, and the ones that died unasked, kept listed for a while. Answered from what the
server knows and the workers' last heartbeats: never a question to a worker, nor a look at its
process, so it is answered at once, whatever the workers do.
"""

from __future__ import annotations

import time
from typing import Any, Final

from sd_rest.runs.workers import Worker

GONE_LISTED: Final = 300.0  # seconds a worker that died unasked stays listed as gone
GONE_KEPT: Final = 8  # of them, at most


class GoneWorkers:
    """The workers that died unasked (not ended by the pool), the latest few, for a while."""

    def __init__(self) -> None:
        self._gone: list[tuple[float, Worker]] = []

    def add(self, worker: Worker) -> None:
        if worker.gone and not worker.closing:
            self._gone = [*self._gone, (time.monotonic(), worker)][-GONE_KEPT:]

    def recent(self) -> list[Worker]:
        now = time.monotonic()
        self._gone = [(when, w) for when, w in self._gone if now - when < GONE_LISTED]
        return [w for _, w in self._gone]


def how_it_ended(worker: Worker) -> str:
    if worker.silenced is not None:
        return f"killed after {worker.silenced:.0f} s without a heartbeat (hung or stopped)"
    return worker.ended.describe() if worker.ended is not None else "unknown"


def listing(worker: Worker, warming: bool) -> dict[str, Any]:
    """What `GET /` shows of a worker; `warming`: it runs its warm-up (worker_pool.py)."""
    if worker.gone:
        state = "gone"
    elif warming:
        state = "warming"
    else:
        state = "busy" if worker.busy else "idle"
    channel = worker.channel
    heartbeat = channel.heartbeat if channel is not None else {}
    here = state != "gone"
    doc: dict[str, Any] = {
        "worker": worker.number,
        "pid": worker.pid,
        "state": state,
        "jobs": worker.jobs,
        "model": worker.model,
        "rss": heartbeat.get("rss") if here else None,
        "models": heartbeat.get("models"),
        "silent": round(channel.silence(), 1) if here and channel is not None else None,
        # To choose --worker-timeout by.
        "longest_silence": round(channel.longest_silence, 1) if channel is not None else None,
    }
    if not here:
        doc["ended"] = how_it_ended(worker)
    return doc
