"""A script that dies without a traceback: the job's error says how it ended (exit status or
signal), never an ordinary output line; internal failures never show their exception text."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from sd_rest.endpoints import ENDPOINTS, TextToImage
from sd_rest.jobs.manager import JobManager
from sd_rest.scripts import RunFolders
from sd_rest.settings import Settings
from sd_rest.state.jobs import Status

from helpers import DEMO_MODELS, FAST_SIMULATOR, SIMULATOR, Server

FIELDS = {"prompt": "dies", "steps": "8"}


def failed_error(server: Server) -> str:
    url = server.post_form("text-to-image", FIELDS).headers["Location"]
    doc = server.wait_status(url, {"FAILED", "COMPLETE"})
    assert doc["status"] == "FAILED", doc
    return str(doc["error"])


def test_a_silent_exit_reports_its_status(make_server) -> None:
    error = failed_error(make_server(env={"SD_SIM_EXIT_AT_STEP": "3:3"}))
    assert error == "the script exited with status 3 without printing an error"


def test_sigkill_reports_the_signal_and_a_hint(make_server) -> None:
    error = failed_error(make_server(env={"SD_SIM_KILL_AT_STEP": "3"}))
    assert error.startswith("the script was killed by SIGKILL: out of memory?"), error
    assert "Running DDIM Sampling" not in error


def test_a_traceback_keeps_its_line_and_adds_the_status(make_server) -> None:
    error = failed_error(make_server(env={"SD_SIM_FAIL_AT_STEP": "2"}))
    assert error == "RuntimeError: simulated failure at step 2 (the script exited with status 1)"


def test_an_internal_failure_shows_an_incident_id_not_its_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: object, root: Path, repository: Path, checkpoint: Path) -> RunFolders:
        raise RuntimeError("cannot write /srv/secret/place")

    # A fault injected where the server prepares a run (no client input can cause one).
    monkeypatch.setattr(TextToImage, "make_run_folders", broken)
    for name, value in FAST_SIMULATOR.items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        repository=SIMULATOR,
        python=Path(sys.executable),
        text_to_image_model=DEMO_MODELS / "text-to-image.ckpt",
        inpaint_image_model=DEMO_MODELS / "inpaint-image.ckpt",
        output=tmp_path / "output",
    )

    async def run_one() -> tuple[Status, str | None]:
        manager = JobManager(settings)
        await manager.start(manager.recover())
        params = {**ENDPOINTS["text-to-image"].defaults, "prompt": "x", "steps": 2}
        job = await manager.submit("text-to-image", params, {}, {})
        while not job.status.finished:
            await asyncio.sleep(0.01)
        await manager.shutdown()
        return job.status, job.error

    status, error = asyncio.run(run_one())
    assert status is Status.FAILED
    assert error is not None and "/srv/secret" not in error
    incident = error.rsplit(" ", 1)[1]
    assert error == f"internal server error while running the job; it was logged as {incident}"
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)
