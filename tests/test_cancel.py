"""DELETE /<endpoint>/<id>: canceling queued and running jobs, and posting them again."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import (
    Server,
    check_finished_job,
    job_folder,
    read_jsonl,
    read_sidecar,
    script_pids,
    wait_script_ended,
    wait_until,
)

PARAMS = {
    "prompt": "a windmill in the rain",
    "steps": "4",
    "iterations": "3",
    "seed": "300",
    "width": "256",
    "height": "256",
}


@pytest.fixture
def argv_log(tmp_path: Path) -> Path:
    return tmp_path / "argv.jsonl"


def unfinished_markers(server: Server) -> list[str]:
    queue = server.output / ".queue"
    return sorted(p.name for p in queue.iterdir()) if queue.exists() else []


def test_cancel_a_queued_job_at_once_and_again(make_server, argv_log: Path) -> None:
    server = make_server(env={"SD_SIM_ARGV_LOG": str(argv_log), "SD_SIM_STEP_SECONDS": "0.05"})
    running = server.post_form("text-to-image", PARAMS).headers["Location"]
    queued = server.post_form("text-to-image", {**PARAMS, "prompt": "queued"}).headers["Location"]
    resp = server.request("DELETE", queued)
    assert resp.status == 200
    assert resp.json() == {"status": "CANCELED", "resultUrl": queued, "imageUrls": [], "images": []}
    assert server.get(queued).json()["status"] == "CANCELED"
    sidecar = read_sidecar(server.output, queued)
    assert sidecar["status"] == "CANCELED" and sidecar["finishedAt"] is not None
    assert queued.replace("/", ".")[1:] not in unfinished_markers(server)
    again = server.request("DELETE", queued)
    assert (again.status, again.body) == (200, resp.body)
    assert server.wait_status(running, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    assert server.get(queued).json()["status"] == "CANCELED"
    assert script_pids(argv_log, queued) == []  # it never ran
    assert server.get("/").json()["queued"] == 0


def test_cancel_unknown_job_is_404(make_server) -> None:
    server = make_server()
    resp = server.request("DELETE", "/image-to-image/" + "f" * 32)
    assert resp.status == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_cancel_a_finished_job_changes_nothing(make_server) -> None:
    server = make_server()
    url = server.post_form("text-to-image", {**PARAMS, "iterations": "1"}).headers["Location"]
    done = server.wait_status(url, {"COMPLETE"})
    resp = server.request("DELETE", url)
    assert resp.status == 200 and resp.json() == done
    assert server.get(url).json() == done
    assert read_sidecar(server.output, url)["status"] == "COMPLETE"


@pytest.mark.parametrize("runner", ["resident", "process"])
def test_cancel_a_running_job_ends_its_script_and_keeps_its_images(
    make_server, argv_log: Path, tmp_path: Path, runner: str
) -> None:
    events = tmp_path / "events.jsonl"
    env = {
        "SD_SIM_ARGV_LOG": str(argv_log),
        "SD_SIM_EVENT_LOG": str(events),
        "SD_SIM_STEP_SECONDS": "0.05",
    }
    server = make_server(env=env, args=["--runner", runner])
    params = {**PARAMS, "steps": "6"}
    url = server.post_form("text-to-image", params).headers["Location"]
    wait_until(
        lambda: any(e.get("batch") == 1 and e.get("step", 0) >= 1 for e in read_jsonl(events)),
        "image 2 begun",
    )
    wait_until(lambda: server.get(url).json()["imageUrls"], "image 1 published")
    first_png = server.get(f"{url}/1.png").body
    (pid,) = script_pids(argv_log, url)

    resp = server.request("DELETE", url)
    assert resp.status == 200
    doc = resp.json()
    assert doc["status"] == "CANCELED" and "progress" not in doc
    kept = len(doc["imageUrls"])
    assert 1 <= kept < 3  # image 1 at least; image 3 was far off
    assert doc["imageUrls"] == [f"{url}/{n}.png" for n in range(1, kept + 1)]
    wait_script_ended(server, [pid])
    sidecar = read_sidecar(server.output, url)
    assert (sidecar["status"], sidecar["pid"], len(sidecar["images"])) == ("CANCELED", None, kept)
    assert not (job_folder(server.output, url) / "run").exists()
    assert url.replace("/", ".")[1:] not in unfinished_markers(server)
    assert server.get(f"{url}/1.png").body == first_png
    assert server.request("DELETE", url).json()["status"] == "CANCELED"

    # Posting it again queues it anew: the images are kept, the rest are made by a run seeded
    # seed + kept, as a resumed job's would be.
    repost = server.post_form("text-to-image", params)
    assert repost.status == 303 and repost.headers["Location"] == url
    assert repost.json()["status"] == "QUEUED"
    assert server.wait_status(url, {"COMPLETE", "FAILED", "CANCELED"})["status"] == "COMPLETE"
    pngs = check_finished_job(server, url, params, tmp_path)
    assert pngs[0] == first_png
    seeds = [r["seed"] for r in read_sidecar(server.output, url)["images"]]
    assert seeds == [300] * kept + [300 + kept] * (3 - kept)


def test_post_again_after_failure_keeps_images_and_makes_the_rest(
    make_server, argv_log: Path
) -> None:
    # Every run fails at its 6th sampler step: 4 steps per image, so each run adds one image
    # (the last run needs only 4 steps and completes).
    server = make_server(env={"SD_SIM_ARGV_LOG": str(argv_log), "SD_SIM_FAIL_AT_STEP": "6"})
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    counts = []
    for _ in range(3):
        doc = server.wait_status(url, {"COMPLETE", "FAILED"})
        counts.append((doc["status"], len(doc["imageUrls"])))
        if doc["status"] == "COMPLETE":
            break
        assert doc["error"] == (
            "RuntimeError: simulated failure at step 6 (the script exited with status 1)"
        )
        again = server.post_form("text-to-image", PARAMS)
        assert again.headers["Location"] == url and again.json()["status"] == "QUEUED"
    assert counts == [("FAILED", 1), ("FAILED", 2), ("COMPLETE", 3)]
    assert len(script_pids(argv_log, url)) == 3
    check_finished_job(server, url, PARAMS)
    assert [r["seed"] for r in read_sidecar(server.output, url)["images"]] == [300, 301, 302]
