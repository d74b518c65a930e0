"""The pure parts of the API node's remote runs (--broker): the worker in a job's sidecar and
status document, the transitions that set and clear it, the unbounded queue that hands every
job to its run at once yet counts and places the ones no worker host has started, and what
`GET /` makes of a worker host's record."""

from __future__ import annotations

import asyncio
import json

import pytest

from sd_rest.cluster.registry import listing, model_queues, parse
from sd_rest.endpoints import ENDPOINTS
from sd_rest.jobs.queue import JobQueue
from sd_rest.state import lifecycle
from sd_rest.state.jobs import Job, RemoteWorker

WORKER = RemoteWorker("gpu-box", 4321, "a" * 32)


def job(number: int) -> Job:
    params = {**ENDPOINTS["text-to-image"].defaults, "prompt": f"job {number}"}
    return Job(
        id=f"{number:032x}",
        endpoint="text-to-image",
        params=params,  # type: ignore[arg-type]
        checkpoint="/m.ckpt",
        uploads={},
        inputs={},
        seq=number,
    )


def test_an_old_sidecar_without_worker_still_loads_and_a_worker_round_trips() -> None:
    old = job(1).to_sidecar()
    assert "worker" not in old
    assert Job.from_sidecar(json.loads(json.dumps(old))).worker is None
    running = lifecycle.applied(job(1), lifecycle.start(job(1), None, 5.0, WORKER))
    doc = json.loads(json.dumps(running.to_sidecar()))
    assert doc["worker"] == {"host": "gpu-box", "pid": 4321, "attempt": "a" * 32}
    assert doc["pid"] is None  # a remote pid is never taken for a process of this machine
    assert Job.from_sidecar(doc).worker == WORKER


@pytest.mark.parametrize("bad", ["gpu-box", {"host": "h", "pid": "12", "attempt": "a"}, {}])
def test_a_damaged_worker_makes_the_sidecar_corrupt(bad: object) -> None:
    doc = {**job(1).to_sidecar(), "worker": bad}
    with pytest.raises((KeyError, TypeError, ValueError)):
        Job.from_sidecar(doc)


def test_the_status_shows_the_worker_while_it_runs_and_why_it_waits_while_queued() -> None:
    waiting = job(1)
    assert waiting.set_waiting("no live worker holds the text-to-image checkpoint m.ckpt")
    assert not waiting.set_waiting("no live worker holds the text-to-image checkpoint m.ckpt")
    doc = waiting.status_document(3)
    assert doc["waiting"].startswith("no live worker") and "worker" not in doc
    running = lifecycle.applied(waiting, lifecycle.start(waiting, None, 5.0, WORKER))
    running.waiting = None
    assert running.status_document(0)["worker"] == {"host": "gpu-box", "pid": 4321}
    running.set_progress(1, 0.5)
    doc = running.status_document()
    assert doc["status"] == "IN_PROGRESS" and doc["worker"] == {"host": "gpu-box", "pid": 4321}
    local = lifecycle.applied(job(2), lifecycle.start(job(2), 99, 5.0))
    local.set_progress(1, 0.5)
    assert "worker" not in local.status_document()


def test_requeue_keeps_the_worker_and_every_end_clears_it() -> None:
    running = lifecycle.applied(job(1), lifecycle.start(job(1), None, 5.0, WORKER))
    assert lifecycle.applied(running, lifecycle.requeue()).worker == WORKER
    for change in (lifecycle.fail("x", 6.0), lifecycle.cancel(6.0)):
        assert lifecycle.applied(running, change).worker is None
    failed = lifecycle.applied(running, lifecycle.fail("x", 6.0))
    assert lifecycle.applied(failed, lifecycle.retry(7)).worker is None


def test_an_unbounded_queue_runs_every_job_at_once_and_places_the_unstarted_ones() -> None:
    async def scenario() -> None:
        begun: list[Job] = []
        gate = asyncio.Event()

        async def run(taken: Job) -> None:
            begun.append(taken)
            await gate.wait()

        queue = JobQueue(None, 3, run)
        told: dict[str, int] = {}
        queue.on_moved = lambda moved: told.update((j.id, n) for j, n in moved)
        jobs = [job(n) for n in range(4)]
        queue.start()
        for one in jobs[:3]:
            place = queue.reserve()
            assert place is not None
            await queue.put(one, place)
        assert queue.reserve() is None  # --max-queue counts the ones not started
        await asyncio.sleep(0)
        assert begun == jobs[:3]  # handed to their runs at once
        assert [queue.position(j) for j in jobs[:3]] == [1, 2, 3]
        queue.taken(jobs[1])  # a worker host started it
        assert queue.position(jobs[1]) == 0 and told[jobs[1].id] == 0
        assert (queue.position(jobs[2]), told[jobs[2].id]) == (2, 2)
        assert queue.waiting == 2 and queue.reserve() is not None
        queue.rejoined(jobs[1])  # handed back: waits again in submission order
        assert [queue.position(j) for j in jobs[:3]] == [1, 2, 3]
        assert told[jobs[1].id] == 2 and told[jobs[2].id] == 3
        gate.set()
        await queue.close()
        assert queue.waiting == 0  # each run ended: nothing waits for it any more

    asyncio.run(scenario())


def test_a_worker_record_in_get_index() -> None:
    record = {
        "id": "w1", "host": "mac", "pid": 12, "state": "busy", "served": 4, "heartbeat": 1.5,
        "jobs": [{"endpoint": "text-to-image", "id": "b" * 32}], "concurrency": 1,
        "runner": "resident", "version": "1",
        "models": [{"model": "text-to-image", "name": "m.ckpt", "sha256": "c" * 64,
                    "queues": ["sha-" + "c" * 32, "name-m.ckpt"]}],
    }  # fmt: skip
    parsed = parse(json.dumps(record).encode())
    assert parsed is not None
    assert model_queues(parsed) == {"sha-" + "c" * 32, "name-m.ckpt"}
    shown = listing(parsed)
    assert shown["models"] == [{"model": "text-to-image", "name": "m.ckpt", "sha256": "c" * 64}]
    assert (shown["host"], shown["pid"], shown["last_heartbeat"]) == ("mac", 12, 1.5)
    assert parse(b"not json") is None and parse(b"[1]") is None
    assert model_queues({"models": ["x", {"queues": "no"}]}) == set()


def test_the_reader_asks_for_a_bounded_number_of_bytes_and_streams_in_turn() -> None:
    from sd_rest.cluster.follower import (
        BACKLOG_BYTES,
        STREAMS_PER_READ,
        TOTAL_BACKLOG_BYTES,
        to_read,
    )  # fmt: skip

    streams = [(f"s{n}", 0) for n in range(3 * STREAMS_PER_READ)]
    first = to_read(streams, 0, 0)
    assert len(first) == STREAMS_PER_READ
    turns = {name for start in range(0, len(streams), STREAMS_PER_READ)
             for name in to_read(streams, 0, start)}  # fmt: skip
    assert turns == {name for name, _ in streams}  # each one in its turn
    held = [("full", BACKLOG_BYTES), ("empty", 0)]
    assert to_read(held, BACKLOG_BYTES, 0) == ["empty"]
    assert to_read(held, TOTAL_BACKLOG_BYTES, 0) == []
