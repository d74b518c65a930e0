"""Restarts: kill -9 at every awkward moment, then start again on the same output folder.

Every test runs the real server process and the simulator's scripts. Timing is driven, not
guessed: the simulator's event log says when a step or an image happens, and SIGSTOP holds a
script (or the server) still at the moment a test wants to kill the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import (
    DEMO_MODELS,
    SIMULATOR,
    Server,
    check_finished_job,
    job_folder,
    mask_bytes,
    png_bytes,
    process_running,
    read_jsonl,
    read_sidecar,
    script_pids,
    wait_gone,
    wait_until,
)

# They count the simulator's runs and read its event log: no warm-up run (conftest.py).
pytestmark = pytest.mark.no_warm_start


PARAMS = {
    "prompt": "a harbour at dusk",
    "steps": "4",
    "iterations": "3",
    "seed": "1000",
    "width": "256",
    "height": "256",
}


@pytest.fixture
def logs(tmp_path: Path) -> dict[str, Path]:
    return {"argv": tmp_path / "argv.jsonl", "events": tmp_path / "events.jsonl"}


def sim_env(logs: dict[str, Path], **knobs: str) -> dict[str, str]:
    return {"SD_SIM_ARGV_LOG": str(logs["argv"]), "SD_SIM_EVENT_LOG": str(logs["events"]), **knobs}


def restart(
    make_server: Callable[..., Server], old: Server, args: list[str] | None = None
) -> Server:
    """The same server again; its scripts need not be slow any more."""
    env = {**old.env, "SD_SIM_STEP_SECONDS": "0.01", "SD_SIM_WRITE_SECONDS": "0"}
    return make_server(output=old.output, env=env, args=args if args is not None else old.args)


def events(logs: dict[str, Path], kind: str) -> list[dict]:
    return [e for e in read_jsonl(logs["events"]) if e["event"] == kind]


def recorded_images(server: Server, url: str) -> int:
    return len(read_sidecar(server.output, url)["images"])


def published_bytes(server: Server, url: str) -> dict[int, bytes]:
    folder = job_folder(server.output, url)
    return {
        r["n"]: (folder / f"{r['n']}.png").read_bytes()
        for r in read_sidecar(server.output, url)["images"]
    }


def kill_server(server: Server, logs: dict[str, Path]) -> None:
    """kill -9, and no script of it may outlive it (even one held by SIGSTOP)."""
    server.kill()
    wait_gone(script_pids(logs["argv"]))


def test_jobs_queued_at_a_kill_run_after_restart_in_submission_order(
    make_server, logs: dict[str, Path], tmp_path: Path
) -> None:
    server = make_server(env=sim_env(logs, SD_SIM_STEP_SECONDS="0.1"))
    first = server.post_form("text-to-image", {**PARAMS, "iterations": "1"}).headers["Location"]
    wait_until(lambda: script_pids(logs["argv"], first), "the first job's script")
    stop_script(logs, first)  # it holds the only worker: the others stay queued
    queued = [
        server.post_form(
            "image-to-image",
            {"prompt": "in autumn", "steps": "4", "strength": "0.5"},
            {"image": png_bytes(256, 256)},
        ).headers["Location"],
        server.post_form(
            "inpaint-image",
            {"steps": "4"},
            {"image": png_bytes(256, 256), "mask": mask_bytes(256, 256)},
        ).headers["Location"],
        server.post_form("text-to-image", {**PARAMS, "prompt": "last one"}).headers["Location"],
    ]
    # The answer to the last POST is all the client has: its job must survive a kill -9 now.
    kill_server(server, logs)
    assert [read_sidecar(server.output, url)["status"] for url in queued] == ["QUEUED"] * 3
    runs_before = len(read_jsonl(logs["argv"]))

    server = restart(make_server, server)
    for url in [first, *queued]:
        assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE", url
    ids = [url.rsplit("/", 1)[1] for url in [first, *queued]]

    def job_of(argv: list[str]) -> int:
        return next(i for i, id_ in enumerate(ids) if any(id_ in arg for arg in argv))

    order = [job_of(run["argv"]) for run in read_jsonl(logs["argv"])[runs_before:]]
    assert order == [0, 1, 2, 3]
    check_finished_job(server, first, {**PARAMS, "iterations": "1"})
    check_finished_job(server, queued[2], {**PARAMS, "prompt": "last one"}, tmp_path)
    for url in queued[:2]:
        doc = server.get(url).json()
        assert len(doc["imageUrls"]) == 1 and server.get(doc["imageUrls"][0]).status == 200


def stop_script(logs: dict[str, Path], url: str) -> None:
    """Hold the job's running script still (SIGSTOP)."""
    for pid in script_pids(logs["argv"], url):
        if process_running(pid):
            os.kill(pid, signal.SIGSTOP)


def kill_mid_image(server: Server, url: str, logs: dict[str, Path]) -> None:
    """Image 1 published, image 2 half way through its steps."""
    wait_until(
        lambda: any(e["batch"] == 1 and e["step"] >= 2 for e in events(logs, "step")),
        "image 2 half done",
    )
    stop_script(logs, url)
    wait_until(lambda: recorded_images(server, url) == 1, "image 1 published")


def kill_between_images(server: Server, url: str, logs: dict[str, Path]) -> None:
    """Images 1 and 2 written and published, image 3 not begun (the script is held still)."""
    wait_until(lambda: len(events(logs, "image")) == 2, "image 2 written")
    stop_script(logs, url)
    wait_until(lambda: recorded_images(server, url) == 2, "image 2 published")
    assert len(events(logs, "image")) == 2


def kill_after_png_written(server: Server, url: str, logs: dict[str, Path]) -> None:
    """Image 2 completely written by the script, but the server never got to publish it: the
    server is held still (SIGSTOP) while the script finishes the file."""
    samples = job_folder(server.output, url) / "run" / "out" / "samples"
    wait_until(lambda: (samples / "00001.png").exists(), "image 2 being written")
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    wait_until(lambda: len(events(logs, "image")) == 2, "image 2 written")
    stop_script(logs, url)
    assert recorded_images(server, url) == 1


@pytest.mark.parametrize(
    ("kill_at", "knobs", "seed"),
    [
        (kill_mid_image, {"SD_SIM_STEP_SECONDS": "0.05"}, "1000"),
        # The resumed run's seed 2**32 wraps around to 0: the scripts' seeds are 32-bit.
        (kill_between_images, {"SD_SIM_STEP_SECONDS": "0.05"}, str(2**32 - 2)),
        (
            kill_after_png_written,
            {"SD_SIM_STEP_SECONDS": "0.02", "SD_SIM_WRITE_SECONDS": "0.8"},
            "77",
        ),
    ],
    ids=["mid-image", "between-images", "png-written-not-published"],
)
def test_kill_9_then_restart_completes_images_1_to_n(
    make_server, logs: dict[str, Path], tmp_path: Path, kill_at, knobs: dict[str, str], seed: str
) -> None:
    params = {**PARAMS, "seed": seed}
    server = make_server(env=sim_env(logs, **knobs))
    url = server.post_form("text-to-image", params).headers["Location"]
    kill_at(server, url, logs)
    kill_server(server, logs)
    before = published_bytes(server, url)
    folder = job_folder(server.output, url)
    # What else an interrupted write leaves: temp files, and a PNG published but not recorded.
    (folder / ".7.png.0badf00d.tmp").write_bytes(b"half")
    (folder / ".job.json.0badf00d.tmp").write_bytes(b"{")
    (folder / f"{len(before) + 1}.png").write_bytes(png_bytes(256, 256))
    (folder / "9.png").write_bytes(png_bytes(256, 256))
    runs = len(read_jsonl(logs["argv"]))

    server = restart(make_server, server)
    assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    pngs = check_finished_job(server, url, params, tmp_path)
    for n, data in before.items():
        assert pngs[n - 1] == data, f"image {n} changed"
    assert len(read_jsonl(logs["argv"])) == runs + 1


def test_job_with_every_image_published_but_not_complete_completes_without_a_run(
    make_server, logs: dict[str, Path]
) -> None:
    """The state a kill -9 leaves between publishing the last image and saving COMPLETE. The
    window is too short to hit with a signal, so the test makes that state on disk: the
    sidecar as it was just before COMPLETE, and the job's marker."""
    server = make_server(env=sim_env(logs))
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    server.wait_status(url, {"COMPLETE"})
    assert server.stop() == 0
    path = job_folder(server.output, url) / "job.json"
    sidecar = json.loads(path.read_bytes())
    sidecar.update(status="IN_PROGRESS", pid=script_pids(logs["argv"], url)[0], finishedAt=None)
    path.write_text(json.dumps(sidecar))
    (server.output / ".queue" / url.strip("/").replace("/", ".")).touch()
    (job_folder(server.output, url) / "run" / "out" / "samples").mkdir(parents=True)
    before = published_bytes(server, url)
    runs = len(read_jsonl(logs["argv"]))

    server = restart(make_server, server)
    assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    assert check_finished_job(server, url, PARAMS) == list(before.values())
    assert len(read_jsonl(logs["argv"])) == runs
    assert list((server.output / ".queue").iterdir()) == []


def test_a_recorded_image_missing_on_disk_is_made_again(
    make_server, logs: dict[str, Path], tmp_path: Path
) -> None:
    """Image 2 of an unfinished job lost from the disk (not something the server does): it
    and image 3 are made again, by a run seeded as the README says; image 1 stays."""
    server = make_server(env=sim_env(logs))
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    server.wait_status(url, {"COMPLETE"})
    assert server.stop() == 0
    path = job_folder(server.output, url) / "job.json"
    sidecar = json.loads(path.read_bytes())
    sidecar.update(status="IN_PROGRESS", finishedAt=None)
    path.write_text(json.dumps(sidecar))
    (server.output / ".queue" / url.strip("/").replace("/", ".")).touch()
    first = (job_folder(server.output, url) / "1.png").read_bytes()
    (job_folder(server.output, url) / "2.png").unlink()

    server = restart(make_server, server)
    assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    assert f"job text-to-image/{url.rsplit('/', 1)[1]}: image 2 is missing on disk" in server.log()
    pngs = check_finished_job(server, url, PARAMS, tmp_path)
    assert pngs[0] == first
    seeds = [r["seed"] for r in read_sidecar(server.output, url)["images"]]
    assert seeds == [1000, 1001, 1001]


def start_fake_orphan(job_dir: Path) -> subprocess.Popen[bytes]:
    """A simulator script with this job's run folder in its argv, as a dead server's script
    that ignored the pty hang-up would be; in its own session, as a pty would have put it."""
    outdir = job_dir / "run" / "out"
    outdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_SIM_")}
    env["SD_SIM_STEP_SECONDS"] = "1"
    argv = [
        sys.executable,
        str(SIMULATOR / "scripts" / "txt2img.py"),
        "--prompt=orphan",
        f"--outdir={outdir}",
        "--skip_grid",
        "--ddim_steps=250",
        "--H=256",
        "--W=256",
        f"--ckpt={DEMO_MODELS / 'text-to-image.ckpt'}",
    ]
    return subprocess.Popen(
        argv,
        cwd=SIMULATOR,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def set_recorded_pid(server: Server, url: str, pid: int) -> None:
    path = job_folder(server.output, url) / "job.json"
    sidecar = json.loads(path.read_bytes())
    assert sidecar["status"] == "IN_PROGRESS"
    sidecar["pid"] = pid
    path.write_text(json.dumps(sidecar))


def test_start_kills_a_recorded_script_still_running_and_nothing_else(
    make_server, logs: dict[str, Path]
) -> None:
    server = make_server(args=["--concurrency", "2"], env=sim_env(logs, SD_SIM_STEP_SECONDS="0.1"))
    ours = server.post_form("text-to-image", PARAMS).headers["Location"]
    other = server.post_form("text-to-image", {**PARAMS, "prompt": "other"}).headers["Location"]
    wait_until(lambda: len(script_pids(logs["argv"])) == 2, "both scripts started")
    wait_until(
        lambda: all(read_sidecar(server.output, u)["pid"] for u in (ours, other)), "pids recorded"
    )
    for url in (ours, other):
        stop_script(logs, url)
    kill_server(server, logs)
    orphan = start_fake_orphan(job_folder(server.output, ours))
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        set_recorded_pid(server, ours, orphan.pid)
        set_recorded_pid(server, other, unrelated.pid)  # a reused pid: not our script

        server = restart(make_server, server)
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert f"ended script {orphan.pid} left running" in server.log()
        for url, params in ((ours, PARAMS), (other, {**PARAMS, "prompt": "other"})):
            assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
            check_finished_job(server, url, params)
        assert unrelated.poll() is None, "an unrelated process was killed"
    finally:
        for process in (orphan, unrelated):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_finished_jobs_are_served_as_they_were(make_server, logs: dict[str, Path]) -> None:
    server = make_server(env=sim_env(logs, SD_SIM_STEP_SECONDS="0.05", SD_SIM_FAIL_AT_STEP="6"))
    complete = server.post_form("text-to-image", {**PARAMS, "iterations": "1"}).headers["Location"]
    failed = server.post_form("text-to-image", {**PARAMS, "prompt": "fails"}).headers["Location"]
    canceled = server.post_form("text-to-image", {**PARAMS, "prompt": "canceled"}).headers[
        "Location"
    ]
    assert server.request("DELETE", canceled).json()["status"] == "CANCELED"
    server.wait_status(failed, {"FAILED", "COMPLETE"})
    server.wait_status(complete, {"COMPLETE"})
    urls = [complete, failed, canceled]
    bodies = {url: server.get(url).body for url in urls}
    images = {u: server.get(u).body for url in urls for u in server.get(url).json()["imageUrls"]}
    assert json.loads(bodies[failed])["status"] == "FAILED" and len(images) == 2
    assert server.stop() == 0
    runs = len(read_jsonl(logs["argv"]))
    # Leftovers in a finished job's folder, as a crash can leave them: the background sweep
    # removes the work folder and temp files old enough not to be a write in progress.
    folder = job_folder(server.output, failed)
    (folder / "run" / "out" / "samples").mkdir(parents=True)
    (folder / "run" / "out" / "samples" / "00000.png").write_bytes(b"partial")
    stale, fresh = folder / ".2.png.0badf00d.tmp", folder / ".job.json.0badf00d.tmp"
    stale.write_bytes(b"stale")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh.write_bytes(b"fresh")

    server = restart(make_server, server)
    wait_until(lambda: not (folder / "run").exists(), "the sweep to remove the work folder")
    assert not stale.exists() and fresh.exists()
    assert {url: server.get(url).body for url in urls} == bodies
    assert {u: server.get(u).body for u in images} == images
    assert len(read_jsonl(logs["argv"])) == runs


def test_corrupt_sidecars_are_quarantined_and_the_server_starts(
    make_server, logs: dict[str, Path]
) -> None:
    server = make_server(env=sim_env(logs, SD_SIM_STEP_SECONDS="0.1"))
    finished = server.post_form(
        "text-to-image", {**PARAMS, "iterations": "1", "steps": "1"}
    ).headers["Location"]
    server.wait_status(finished, {"COMPLETE"})
    running = server.post_form("text-to-image", PARAMS).headers["Location"]
    wait_until(lambda: script_pids(logs["argv"], running), "its script")
    stop_script(logs, running)
    kill_server(server, logs)
    damage = {
        finished: b'{"version": 1, "id": ',  # cut short
        running: b"[]",  # JSON, but not a sidecar
    }
    for url, data in damage.items():
        (job_folder(server.output, url) / "job.json").write_bytes(data)
    # A finished job nobody asks for: found by the background sweep.
    stray = server.output / "text-to-image" / ("ab" * 16)
    stray.mkdir()
    (stray / "job.json").write_bytes(b'{"version": 1}')
    # A POST cut short before its sidecar was written (it was never answered): removed.
    unanswered = server.output / "image-to-image" / ("cd" * 16)
    (unanswered / "inputs").mkdir(parents=True)
    (unanswered / "inputs" / ".image.png.0badf00d.tmp").write_bytes(b"half an upload")
    (server.output / ".queue" / f"image-to-image.{'cd' * 16}").touch()

    server = restart(make_server, server)
    quarantine = server.output / ".quarantine"
    wait_until(lambda: not stray.exists(), "the sweep to quarantine the stray job")
    for url in damage:
        assert server.get(url).status == 404
        assert not job_folder(server.output, url).exists()
    log = server.log()
    for url, data in damage.items():
        assert f"{job_folder(server.output, url) / 'job.json'} to " in log
        (moved,) = quarantine.glob(f"text-to-image-{url.rsplit('/', 1)[1]}-*")
        assert (moved / "job.json").read_bytes() == data
    assert f"{stray / 'job.json'} to " in log
    assert not unanswered.exists()
    assert server.get(f"/image-to-image/{'cd' * 16}").status == 404
    assert list((server.output / ".queue").iterdir()) == []
    # The server works, and the same request can be made again.
    again = server.post_form("text-to-image", PARAMS).headers["Location"]
    assert again == running
    assert server.wait_status(again, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    check_finished_job(server, again, PARAMS)


def test_delete_incomplete_removes_every_job_not_complete(
    make_server, logs: dict[str, Path]
) -> None:
    server = make_server(env=sim_env(logs, SD_SIM_STEP_SECONDS="0.05", SD_SIM_FAIL_AT_STEP="6"))
    complete = server.post_form("text-to-image", {**PARAMS, "iterations": "1"}).headers["Location"]
    failed = server.post_form("text-to-image", {**PARAMS, "prompt": "fails"}).headers["Location"]
    server.wait_status(failed, {"FAILED"})
    running = server.post_form("text-to-image", {**PARAMS, "prompt": "running", "iterations": "1"})
    running_url = running.headers["Location"]
    wait_until(lambda: script_pids(logs["argv"], running_url), "its script")
    stop_script(logs, running_url)  # held before it could finish
    wait_until(lambda: read_sidecar(server.output, running_url)["pid"], "its pid recorded")
    canceled = server.post_form("text-to-image", {**PARAMS, "prompt": "canceled"}).headers[
        "Location"
    ]
    assert server.request("DELETE", canceled).json()["status"] == "CANCELED"
    queued = server.post_form("text-to-image", {**PARAMS, "prompt": "queued"}).headers["Location"]
    kill_server(server, logs)
    # Its script outlived the server (it ignored the hang-up): it must not outlive the deletion.
    orphan = start_fake_orphan(job_folder(server.output, running_url))
    try:
        set_recorded_pid(server, running_url, orphan.pid)
        complete_png = server.output / complete.strip("/") / "1.png"
        before = complete_png.read_bytes()
        runs = len(read_jsonl(logs["argv"]))

        server = restart(make_server, server, args=["--delete-incomplete"])
        assert f"deleted 4 incomplete job(s) from {server.output}" in server.log()
        assert orphan.wait(timeout=10) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    for url in (failed, canceled, running_url, queued):
        assert not job_folder(server.output, url).exists()
        assert server.get(url).status == 404
    assert list((server.output / ".queue").glob("*")) == []
    assert server.get(complete).json()["status"] == "COMPLETE"
    assert server.get(f"{complete}/1.png").body == before
    assert server.get("/").json()["queued"] == 0
    assert len(read_jsonl(logs["argv"])) == runs


def test_an_unfinished_jobs_image_that_is_a_link_is_made_again(
    make_server, logs: dict[str, Path], tmp_path: Path
) -> None:
    server = make_server(env=sim_env(logs, SD_SIM_STEP_SECONDS="0.05"))
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    kill_between_images(server, url, logs)
    kill_server(server, logs)
    image = job_folder(server.output, url) / "1.png"
    outside = tmp_path / "outside.png"
    outside.write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(outside)

    server = restart(make_server, server)
    assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    assert not image.is_symlink()
    assert "image 1 is missing on disk" in server.log()
    check_finished_job(server, url, PARAMS, tmp_path)  # every image served, made by the seed rule


def test_a_job_whose_input_became_a_link_fails_clearly_and_a_repost_restores_it(
    make_server, logs: dict[str, Path], tmp_path: Path
) -> None:
    server = make_server(env=sim_env(logs, SD_SIM_LOAD_SECONDS="60"))
    fields = {"prompt": "from an upload", "steps": "4", "strength": "0.5"}
    files = {"image": png_bytes(256, 256)}
    blocker = server.post_form("text-to-image", PARAMS).headers["Location"]
    wait_until(lambda: script_pids(logs["argv"], blocker), "the first job's script")
    url = server.post_form("image-to-image", fields, files).headers["Location"]
    kill_server(server, logs)
    upload = job_folder(server.output, url) / "inputs" / "image.png"
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(256, 256, (9, 9, 9)))
    upload.unlink()
    upload.symlink_to(outside)

    server = make_server(output=server.output, env=sim_env(logs))
    doc = server.wait_status(url, {"COMPLETE", "FAILED"})
    assert doc["status"] == "FAILED"
    assert doc["error"].startswith("the job's input files are missing from its folder")
    assert server.post_form("image-to-image", fields, files).json()["status"] == "QUEUED"
    assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    assert not upload.is_symlink() and outside.read_bytes() == png_bytes(256, 256, (9, 9, 9))


def test_a_resumed_job_reads_queued_while_its_script_loads_like_a_new_one(
    make_server, logs: dict[str, Path]
) -> None:
    server = make_server(env=sim_env(logs, SD_SIM_STEP_SECONDS="0.05"))
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    kill_between_images(server, url, logs)
    kill_server(server, logs)

    server = make_server(output=server.output, env=sim_env(logs, SD_SIM_LOAD_SECONDS="1.5"))
    docs = list(server.poll(url, {"COMPLETE", "FAILED"}))
    first_progress = next(i for i, d in enumerate(docs) if d["status"] == "IN_PROGRESS")
    loading = docs[:first_progress]
    assert len(loading) > 10  # seen throughout the 1.5 s load
    assert {d["status"] for d in loading} == {"QUEUED"}
    assert all(d["imageUrls"] == [f"{url}/1.png", f"{url}/2.png"] for d in loading)
    assert docs[first_progress]["progress"]["currentImageIndex"] == 3
