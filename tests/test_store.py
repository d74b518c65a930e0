"""The store in process: durable before visible, announced after; refused writes; the
bounded cache of finished jobs; damaged and linked folders."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from sd_rest.state import lifecycle
from sd_rest.state.events import JobEvents
from sd_rest.state.jobs import ImageRecord, Job, Status, job_id
from sd_rest.state.layout import Layout
from sd_rest.state.lifecycle import IllegalTransition
from sd_rest.state.store import JobStore

from inprocess import Recorder, text_params


def new_job(prompt: str = "x", **params: object) -> Job:
    p = text_params(prompt=prompt, **params)
    return Job(
        id=job_id("text-to-image", p, "/m.ckpt", {}),
        endpoint="text-to-image",
        params=p,
        checkpoint="/m.ckpt",
        uploads={},
        inputs={},
        seq=time.time_ns(),
        created_at=time.time(),
    )


def make_store(tmp_path: Path, finished_cache: int = 1024) -> JobStore:
    return JobStore(Layout(tmp_path / "output"), JobEvents(), finished_cache)


def sidecar(store: JobStore, job: Job) -> dict:
    return json.loads(store.layout.sidecar(job.endpoint, job.id).read_bytes())


def block_writes(store: JobStore, job: Job) -> Path:
    """A real refusal: the job's folder is replaced by a file, so nothing can be written in it."""
    folder = store.layout.job_dir(job.endpoint, job.id)
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)
    folder.write_bytes(b"in the way")
    return aside


def unblock(store: JobStore, job: Job, aside: Path) -> None:
    folder = store.layout.job_dir(job.endpoint, job.id)
    folder.unlink()
    aside.rename(folder)


def test_a_commit_is_on_disk_then_in_memory_then_announced(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(tmp_path)
        recorder = Recorder(store.events)
        job = new_job()
        await store.add(job, {})
        assert sidecar(store, job)["status"] == "QUEUED"
        assert store.layout.marker(job.endpoint, job.id).exists()
        seen_on_disk: list[str] = []
        store.events.listen(lambda event: seen_on_disk.append(sidecar(store, event.job)["status"]))
        version = job.version
        await store.commit(job, lifecycle.start(job, 123, time.time()))
        assert job.status is Status.IN_PROGRESS and job.pid == 123
        assert seen_on_disk == ["IN_PROGRESS"]  # written before anyone heard of it
        assert job.version == version + 1
        record = ImageRecord(1, 42, 1, "ab")
        await store.commit(job, lifecycle.publish(job, record))
        await store.commit(job, lifecycle.complete(time.time()))
        assert not store.layout.marker(job.endpoint, job.id).exists()
        assert sidecar(store, job)["status"] == "COMPLETE"
        assert recorder.kinds(job) == ["queued", "started", "image", "complete"]
        assert recorder.seen[2].data == record

    asyncio.run(scenario())


def test_a_refused_commit_changes_nothing_and_announces_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(tmp_path)
        job = new_job()
        await store.add(job, {})
        recorder = Recorder(store.events)
        aside = block_writes(store, job)
        version = job.version
        with pytest.raises(OSError):
            await store.commit(job, lifecycle.start(job, 1, time.time()))
        assert job.status is Status.QUEUED and job.pid is None and job.version == version
        assert recorder.seen == []
        unblock(store, job, aside)

    asyncio.run(scenario())


def test_an_illegal_change_is_refused_before_any_write(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(tmp_path)
        job = new_job()
        await store.add(job, {})
        before = store.layout.sidecar(job.endpoint, job.id).read_bytes()
        with pytest.raises(IllegalTransition):
            await store.commit(job, lifecycle.retry(5))  # a queued job is not retried
        with pytest.raises(IllegalTransition):
            await store.commit(job, lifecycle.complete(time.time()))  # no image yet
        assert store.layout.sidecar(job.endpoint, job.id).read_bytes() == before

    asyncio.run(scenario())


def test_a_settled_outcome_shows_at_once_and_reaches_the_disk_when_it_can(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(tmp_path)
        job = new_job()
        await store.add(job, {})
        await store.commit(job, lifecycle.start(job, 5, time.time()))
        aside = block_writes(store, job)
        await store.settle(job, lifecycle.fail("the disk is full", time.time()))
        assert job.status is Status.FAILED and store.unsynced == 1
        assert await store.sync() == 1  # still refused
        unblock(store, job, aside)
        assert sidecar(store, job)["status"] == "IN_PROGRESS"  # until the retry
        await asyncio.sleep(1.2)  # the background retry runs every second
        assert store.unsynced == 0
        assert sidecar(store, job)["status"] == "FAILED"
        assert not store.layout.marker(job.endpoint, job.id).exists()
        await store.close()

    asyncio.run(scenario())


def test_finished_jobs_are_kept_in_a_bounded_cache(tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = make_store(tmp_path)
        jobs = [new_job(f"p{n}") for n in range(5)]
        for job in jobs:
            await writer.add(job, {})
            await writer.commit(job, lifecycle.cancel(time.time()))
        unfinished = new_job("still queued")
        await writer.add(unfinished, {})

        store = make_store(tmp_path, finished_cache=3)
        store.keep(store.read_job(unfinished.endpoint, unfinished.id))  # as recovery does
        loaded = [await store.get(job.endpoint, job.id) for job in jobs]
        assert all(job is not None and job.status is Status.CANCELED for job in loaded)
        assert len(store) == 3 + 1  # the unfinished one is always kept
        assert store.cached(jobs[0].endpoint, jobs[0].id) is None  # the oldest went
        assert store.cached(jobs[4].endpoint, jobs[4].id) is loaded[4]
        again = await store.get(jobs[0].endpoint, jobs[0].id)
        assert again is not None and again.to_sidecar() == loaded[0].to_sidecar()
        assert store.cached(jobs[1].endpoint, jobs[1].id) is None  # now the least recent

    asyncio.run(scenario())


def test_a_retried_finished_job_leaves_the_cache_for_good(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(tmp_path, finished_cache=1)
        job = new_job()
        await store.add(job, {})
        await store.commit(job, lifecycle.cancel(time.time()))
        await store.commit(job, lifecycle.retry(time.time_ns()))
        for n in range(3):  # more finished jobs than the cache holds
            other = new_job(f"other {n}")
            await store.add(other, {})
            await store.commit(other, lifecycle.cancel(time.time()))
        assert store.cached(job.endpoint, job.id) is job

    asyncio.run(scenario())


def test_damaged_sidecars_and_linked_folders_are_quarantined(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(tmp_path)
        damaged, linked = new_job("damaged"), new_job("linked")
        for job in (damaged, linked):
            await store.add(job, {})
        store.layout.sidecar(damaged.endpoint, damaged.id).write_bytes(b'{"version": 1')
        folder = store.layout.job_dir(linked.endpoint, linked.id)
        shutil.move(folder, tmp_path / "elsewhere")
        folder.symlink_to(tmp_path / "elsewhere", target_is_directory=True)

        fresh = make_store(tmp_path)
        assert await fresh.get(damaged.endpoint, damaged.id) is None
        assert await fresh.get(linked.endpoint, linked.id) is None
        moved = sorted(p.name.split("-")[3] for p in fresh.layout.quarantine_dir.iterdir())
        assert moved == sorted([damaged.id, linked.id])
        assert (tmp_path / "elsewhere" / "job.json").exists()  # the link's target untouched

    asyncio.run(scenario())


def test_waiting_for_a_change(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(tmp_path)
        job = new_job()
        await store.add(job, {})
        version = job.version
        assert not await store.events.changed(job, version, timeout=0.05)
        waiting = asyncio.create_task(store.events.changed(job, version, timeout=5))
        await asyncio.sleep(0.01)
        await store.commit(job, lifecycle.cancel(time.time()))
        assert await waiting is True
        assert await store.events.changed(job, version, timeout=0)  # already past it

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("startedAt", 1e12),  # a year past 9999
        ("finishedAt", "noon"),
        ("createdAt", float("inf")),
        ("createdAt", None),
        ("startedAt", True),
        ("finishedAt", -1e20),
    ],
)
def test_a_sidecar_with_a_time_no_date_can_show_is_corrupt(name: str, value: object) -> None:
    """Such a sidecar was taken as a job, then failed each time its job was listed."""
    doc = {**new_job().to_sidecar(), "startedAt": 1.5e9, "finishedAt": None, name: value}
    with pytest.raises((ValueError, TypeError)):
        Job.from_sidecar(json.loads(json.dumps(doc)))


def test_a_sidecar_with_text_that_is_no_utf8_is_corrupt() -> None:
    """A lone surrogate escaped in its JSON: its listing item could never be written."""
    data = json.loads(json.dumps(new_job().to_sidecar()))
    data["params"]["prompt"] = json.loads('"\\ud800"')  # what json.loads makes of the escape
    assert data["params"]["prompt"] == "\ud800"
    with pytest.raises(ValueError):
        Job.from_sidecar(data)


def test_a_sidecar_with_times_that_can_be_shown_is_read() -> None:
    doc = {**new_job().to_sidecar(), "createdAt": 0, "startedAt": 1.5e9, "finishedAt": None}
    job = Job.from_sidecar(doc)
    assert (job.created_at, job.started_at, job.finished_at) == (0.0, 1.5e9, None)
