"""A full output disk never strands a job: the script is stopped, the job ends FAILED saying
the disk is full (visible at once, written to its sidecar as soon as space returns), DELETE
and re-POST keep working, and a POST the disk cannot take is a 507 `disk_full`.

Two levels: a real small file system (a tmpfs, when the tests run as root, as CI does), and,
for everyone, an OSError injected at each kind of write the server makes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.jobs.manager import JobManager
from sd_rest.runs import publisher as publisher_module
from sd_rest.settings import Settings
from sd_rest.state import jobfiles as store_module
from sd_rest.state.jobs import Job, Status

from helpers import (
    DEMO_MODELS,
    FAST_SIMULATOR,
    SIMULATOR,
    Server,
    job_folder,
    process_running,
    read_sidecar,
    script_pids,
    wait_script_ended,
    wait_until,
)

PARAMS = {"prompt": "a full disk", "steps": "4", "iterations": "3", "width": "256", "height": "256"}
DISK_FULL = "the output disk is full"


def test_a_job_that_would_eat_into_the_kept_free_space_is_refused_up_front(make_server) -> None:
    server: Server = make_server(args=["--min-free-space", "1000000T"])
    resp = server.post_form("text-to-image", PARAMS)
    assert resp.status == 507
    error = resp.json()["error"]
    assert error["code"] == "disk_full"
    assert "--min-free-space" in error["message"]
    assert server.get("/").json()["queued"] == 0


def test_a_bad_min_free_space_stops_the_start_with_one_line(make_server) -> None:
    server: Server = make_server(args=["--min-free-space", "lots"], start=False)
    server.start(wait=False)
    assert server.process is not None and server.process.wait(20) != 0
    assert "--min-free-space: 'lots' is not a size" in server.log()


# --- a real small file system ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the injected-fault tests below cover the rest)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk` with one file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        block = b"\0" * 65536
        try:
            while True:
                out.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        try:
            while True:
                out.write(b"\0")
        except OSError:
            pass
    return filler


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_disk_that_fills_while_a_job_runs(make_server, small_disk: Path, tmp_path: Path) -> None:
    argv_log = tmp_path / "argv.jsonl"
    server: Server = make_server(
        output=small_disk / "output",
        args=["--min-free-space", "0"],
        env={"SD_SIM_ARGV_LOG": str(argv_log), "SD_SIM_STEP_SECONDS": "0.15"},
    )
    done = server.post_form("text-to-image", {**PARAMS, "iterations": "1"}).headers["Location"]
    assert server.wait_status(done, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    finished_files = file_digests(job_folder(server.output, done))

    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    wait_until(lambda: len(server.get(url).json()["imageUrls"]) == 1, "image 1 published")
    filler = fill(small_disk)

    doc = server.wait_status(url, {"FAILED", "COMPLETE"})
    assert doc["status"] == "FAILED", doc
    assert doc["error"].startswith(DISK_FULL), doc["error"]
    assert doc["imageUrls"] == [f"{url}/1.png"]
    wait_script_ended(server, script_pids(argv_log, url))
    assert server.get("/").json()["running"] == 0
    # While the disk stays full: new jobs are refused, DELETE answers, finished jobs stand.
    refused = server.post_form("text-to-image", {**PARAMS, "prompt": "another"})
    assert (refused.status, refused.json()["error"]["code"]) == (507, "disk_full")
    assert server.post_form("text-to-image", PARAMS).status == 507  # the re-POST too
    assert server.request("DELETE", url).json()["status"] == "FAILED"
    assert server.get(f"{url}/1.png").status == 200

    filler.unlink()  # space returns: memory reaches the sidecar without any request
    wait_until(lambda: read_sidecar(server.output, url)["status"] == "FAILED", "FAILED on disk")
    assert read_sidecar(server.output, url)["error"] == doc["error"]
    first_image = server.get(f"{url}/1.png").body

    again = server.post_form("text-to-image", PARAMS)
    assert again.json()["status"] == "QUEUED"
    final = server.wait_status(url, {"FAILED", "COMPLETE"})
    assert final["status"] == "COMPLETE", final
    assert server.get(f"{url}/1.png").body == first_image  # kept, not made again
    assert len(final["imageUrls"]) == 3
    assert file_digests(job_folder(server.output, done)) == finished_files


# --- an OSError at each write --------------------------------------------------------------


class FullDisk:
    """From the `at`-th write of kind `kind` on, every write the server makes fails with
    ENOSPC (the disk stays full) until `free()`."""

    def __init__(self, kind: str, at: int) -> None:
        self.kind, self.at = kind, at
        self.counts: Counter[str] = Counter()
        self.full = False
        self.refused = 0

    def write(self, kind: str) -> None:
        if not self.full:
            self.counts[kind] += 1
            self.full = kind == self.kind and self.counts[kind] >= self.at
        if self.full:
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def free(self) -> None:
        self.full = False
        self.kind = ""


class FaultyLog:
    def __init__(self, file: Any, disk: FullDisk) -> None:
        self._file, self._disk = file, disk

    def write(self, data: bytes) -> int:
        self._disk.write("log")
        return int(self._file.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, int], FullDisk]:
    def install(kind: str, at: int) -> FullDisk:
        full = FullDisk(kind, at)
        store_write = store_module.write_atomic
        image_write = publisher_module.write_atomic
        real_fdopen = os.fdopen

        def store_atomic(path: Path, data: bytes) -> None:
            full.write("sidecar" if path.name == "job.json" else "input")
            store_write(path, data)

        def image_atomic(path: Path, data: bytes) -> None:
            full.write("image")
            image_write(path, data)

        def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            file = real_fdopen(fd, mode, *args, **kwargs)
            return FaultyLog(file, full) if "a" in mode else file

        monkeypatch.setattr(store_module, "write_atomic", store_atomic)
        monkeypatch.setattr(publisher_module, "write_atomic", image_atomic)
        monkeypatch.setattr(os, "fdopen", fdopen)
        return full

    return install


def settings(tmp_path: Path) -> Settings:
    return Settings(
        repository=SIMULATOR,
        python=Path(sys.executable),
        text_to_image_model=DEMO_MODELS / "text-to-image.ckpt",
        inpaint_image_model=DEMO_MODELS / "inpaint-image.ckpt",
        output=tmp_path / "output",
        min_free_space=0,
    )


def job_params(prompt: str = "x") -> dict[str, int | float | str]:
    defaults = dict(ENDPOINTS["text-to-image"].defaults)
    return {**defaults, "prompt": prompt, "steps": 4, "iterations": 3, "width": 256, "height": 256}


def on_disk(tmp_path: Path, job: Job) -> dict[str, Any]:
    sidecar = tmp_path / "output" / job.endpoint / job.id / "job.json"
    return dict(json.loads(sidecar.read_bytes()))


async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


WRITES = [
    ("sidecar", 1),  # the new job itself: the POST gets 507
    ("input", 1),  # an image-to-image upload: 507 too
    ("sidecar", 2),  # IN_PROGRESS
    ("log", 1),  # the run's header in job.log
    ("log", 4),  # the script's output, mid-run
    ("image", 1),  # the copy of image 1
    ("sidecar", 3),  # recording image 1
    ("image", 2),
    ("sidecar", 5),  # recording the last image
    ("sidecar", 6),  # the outcome: COMPLETE
]


@pytest.mark.parametrize("runner", ["resident", "process"])
@pytest.mark.parametrize(("kind", "at"), WRITES, ids=[f"{k}-{n}" for k, n in WRITES])
def test_an_oserror_at_each_write_never_strands_the_job(
    kind: str,
    at: int,
    runner: str,
    disk: Callable[[str, int], FullDisk],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {**FAST_SIMULATOR, "SD_SIM_STEP_SECONDS": "0.03"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SD_SIM_ARGV_LOG", str(tmp_path / "argv.jsonl"))
    full = disk(kind, at)

    async def scenario() -> None:
        manager = JobManager(replace(settings(tmp_path), runner=runner))
        await manager.start(manager.recover())
        endpoint, uploads, inputs = "text-to-image", {}, {}
        if kind == "input":
            endpoint = "image-to-image"
            uploads = inputs = {"image": _png()}
        params = job_params()
        if endpoint == "image-to-image":
            params = {k: v for k, v in params.items() if k not in ("width", "height")}
            params["strength"] = 0.75
        try:
            job = await manager.submit(endpoint, params, uploads, inputs)
        except ApiError as error:
            # The disk refused the job itself: a 507 of its own, and nothing left behind.
            assert (error.status, error.code) == (507, "disk_full")
            assert not (tmp_path / "output" / endpoint).exists() or not any(
                (tmp_path / "output" / endpoint).iterdir()
            )
            full.free()
            job = await manager.submit(endpoint, params, uploads, inputs)
            await until(lambda: job.status.finished, "the job to finish")
            assert job.status is Status.COMPLETE, job.error
            await manager.shutdown()
            return
        await until(lambda: job.status.finished, "the job to end", timeout=30)
        assert full.refused > 0, "the fault was never reached"
        if runner == "process":
            pids = [r["pid"] for r in _argv_runs(tmp_path)]
            await until(lambda: not any(process_running(p) for p in pids), "its script to end")
        else:
            # The script ended inside its worker, which stays for the next job.
            workers = manager.workers()
            # None busy (none at all, if never begun; the warm-up of one is no job's).
            assert all(w["state"] in ("idle", "warming") for w in workers), workers
        if job.status is Status.COMPLETE:
            assert (kind, at) == ("sidecar", 6)  # only the outcome's own write came after
        else:
            assert job.status is Status.FAILED, job
            assert job.error is not None and job.error.startswith(DISK_FULL), job.error
            await until(lambda: manager.running == 0, "its worker to be free")
            # DELETE and re-POST while full: answered, nothing stranded.
            assert (await manager.cancel(job)).status is Status.FAILED
            with pytest.raises(ApiError) as refused:
                await manager.submit(endpoint, params, uploads, inputs)
            assert refused.value.status == 507
        memory_status = job.status.value
        full.free()
        await until(
            lambda: on_disk(tmp_path, job)["status"] == memory_status, "the sidecar to agree"
        )
        assert on_disk(tmp_path, job)["images"] == [image.to_json() for image in job.images]
        if job.status is Status.FAILED:
            kept = list(job.images)
            again = await manager.submit(endpoint, params, uploads, inputs)
            assert again is job and job.status is Status.QUEUED
            await until(lambda: job.status.finished, "the job to finish again", timeout=30)
            assert job.status is Status.COMPLETE, job.error
            assert list(job.images[: len(kept)]) == kept
        assert len(job.images) == 3
        await manager.shutdown()
        assert on_disk(tmp_path, job)["status"] == "COMPLETE"

    asyncio.run(scenario())


def _argv_runs(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "argv.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()
