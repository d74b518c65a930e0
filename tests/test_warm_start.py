"""Warm start (issue 18): a resident worker loads the text-to-image model when the server starts
and whenever a worker is replaced (not after an idle stop: that one gives its memory back), so
that no job waits for the model; the warm-up changes no image's bytes, is no job of the worker's
(--worker-max-jobs), and a job that comes while it runs waits for that worker, or is canceled at
once. Real workers on the simulator; `--no-warm-start` turns it off."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sd_rest.jobs.manager import JobManager
from sd_rest.state.jobs import Status

from helpers import FAST_SIMULATOR, Server, check_finished_job, process_running, wait_until
from inprocess import settings, started_pids, text_params, until


@pytest.fixture(autouse=True)
def fast_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_SIMULATOR.items():
        monkeypatch.setenv(name, value)


def test_the_first_job_finds_the_model_loaded_and_its_images_unchanged(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server()
    workers: list[dict[str, Any]] = wait_until(
        lambda: [w for w in server.get("/").json()["workers"] if w["state"] == "idle"],
        "a warm worker before any job",
    )
    (warm,) = workers
    assert warm["jobs"] == 0 and warm["models"], warm  # the model is in it already
    params = {"prompt": "a warm start", "iterations": "2", "steps": "4", "seed": "5",
              "width": "256", "height": "256"}  # fmt: skip
    url = server.post_form("text-to-image", params).headers["Location"]
    server.wait_status(url, {"COMPLETE", "FAILED"})
    check_finished_job(server, url, params, tmp_path / "by-hand")  # byte for byte, by hand
    (worker,) = server.get("/").json()["workers"]
    assert (worker["pid"], worker["jobs"]) == (warm["pid"], 1)
    assert worker["model"]["model"] == "hit", worker  # the first job built nothing


def test_no_warm_start_starts_no_worker_before_a_job(make_server: Callable[..., Server]) -> None:
    server = make_server(["--no-warm-start"])
    assert server.get("/").json()["workers"] == []
    url = server.post_form("text-to-image", {"prompt": "cold", "steps": "2"}).headers["Location"]
    server.wait_status(url, {"COMPLETE"})
    (worker,) = server.get("/").json()["workers"]
    assert worker["model"]["model"] == "built", worker


def test_a_worker_replaced_after_max_jobs_is_replaced_by_a_warm_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "out", worker_max_jobs=1))
        await manager.start(manager.recover())
        ran_under = started_pids(manager)
        first = await manager.submit("text-to-image", text_params(prompt="one"), {}, {})
        await until(lambda: first.status.finished, "job 1", timeout=30)
        assert first.status is Status.COMPLETE, first.error

        def warm_replacement() -> list[dict[str, Any]]:
            return [
                w
                for w in manager.workers()
                if w["state"] == "idle" and w["pid"] != ran_under[first.id]
            ]

        await until(warm_replacement, "a warm replacement")
        (warm,) = warm_replacement()
        # The warm-up is no job: the replacement is not itself retired after it.
        assert warm["jobs"] == 0 and warm["models"], warm
        second = await manager.submit("text-to-image", text_params(prompt="two"), {}, {})
        await until(lambda: second.status.finished, "job 2", timeout=30)
        assert second.status is Status.COMPLETE, second.error
        assert ran_under[second.id] == warm["pid"]
        await manager.shutdown()

    asyncio.run(scenario())


def test_a_job_that_comes_during_the_warm_up_waits_for_that_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_SIM_LOAD_SECONDS", "1.0")  # the warm-up's checkpoint read

    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "out"))
        await manager.start(manager.recover())
        ran_under = started_pids(manager)
        (warming,) = manager.workers()
        assert warming["state"] == "warming"
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job", timeout=30)
        assert job.status is Status.COMPLETE, job.error
        (worker,) = manager.workers()  # no second worker was started for it
        assert worker["worker"] == warming["worker"] and worker["pid"] == ran_under[job.id]
        await manager.shutdown()

    asyncio.run(scenario())


def test_a_job_canceled_while_it_waits_for_the_warm_up_ends_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SD_SIM_LOAD_SECONDS", "5.0")

    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "out"))
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: manager.running == 1, "the job waiting for its worker")
        await manager.cancel(job)
        await until(lambda: job.status.finished, "the job to end")
        assert job.status is Status.CANCELED
        (worker,) = manager.workers()
        assert worker["state"] == "warming", worker  # the cancel did not wait for it
        await manager.shutdown()
        assert worker["pid"] is None or not process_running(worker["pid"])

    asyncio.run(scenario())
