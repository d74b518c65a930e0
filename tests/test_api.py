"""The API end to end: a real server over HTTPS, running the simulator's scripts."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from PIL import Image

from helpers import Server, mask_bytes, png_bytes


def progress_never_backwards(docs: list[dict]) -> None:
    seen = [
        (d["progress"]["currentImageIndex"], d["progress"]["currentImageProgress"])
        for d in docs
        if d["status"] == "IN_PROGRESS"
    ]
    assert seen == sorted(seen), seen


def fetch_pngs(server: Server, doc: dict) -> list[Image.Image]:
    images = []
    for url in doc["imageUrls"]:
        resp = server.get(url)
        assert resp.status == 200, url
        assert resp.headers["Content-Type"] == "image/png"
        image = Image.open(io.BytesIO(resp.body))
        image.load()
        images.append(image)
    return images


def test_text_to_image_end_to_end(make_server) -> None:
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.03"})
    resp = server.post_form("text-to-image", {"prompt": "a lighthouse", "steps": "10", "seed": "7"})
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith("/text-to-image/") and len(location.rsplit("/", 1)[1]) == 32
    body = resp.json()
    assert body["resultUrl"] == location
    assert body["status"] == "QUEUED"
    docs = list(server.poll(location, {"COMPLETE", "FAILED"}))
    statuses = [d["status"] for d in docs]
    assert statuses[-1] == "COMPLETE", docs[-1]
    assert "IN_PROGRESS" in statuses
    in_progress = [d for d in docs if d["status"] == "IN_PROGRESS"]
    assert any(0 < d["progress"]["currentImageProgress"] < 1 for d in in_progress)
    assert all(d["progress"]["totalImages"] == 1 for d in in_progress)
    progress_never_backwards(docs)
    final = docs[-1]
    assert set(final) >= {"status", "resultUrl", "imageUrls"}
    assert "progress" not in final
    assert final["imageUrls"] == [f"{location}/1.png"]
    (image,) = fetch_pngs(server, final)
    assert image.size == (512, 512)


def test_batches_and_iterations_number_every_image(make_server) -> None:
    server = make_server()
    resp = server.post_form(
        "text-to-image",
        {
            "prompt": "tiles",
            "iterations": "2",
            "batchSize": "2",
            "steps": "4",
            "width": "256",
            "height": "320",
        },
    )
    location = resp.headers["Location"]
    docs = list(server.poll(location, {"COMPLETE", "FAILED"}))
    assert docs[-1]["status"] == "COMPLETE", docs[-1]
    for doc in docs:
        if doc["status"] == "IN_PROGRESS":
            assert doc["progress"]["totalImages"] == 4
            assert 1 <= doc["progress"]["currentImageIndex"] <= 4
    progress_never_backwards(docs)
    assert docs[-1]["imageUrls"] == [f"{location}/{n}.png" for n in range(1, 5)]
    images = fetch_pngs(server, docs[-1])
    assert [image.size for image in images] == [(256, 320)] * 4
    assert len({image.tobytes() for image in images}) == 4  # four different images


REQUESTS = {
    "text-to-image": ({"prompt": "a red fox", "steps": "10", "width": "256", "height": "256"}, {}),
    "image-to-image": (
        {"prompt": "a red fox in snow", "steps": "20", "strength": "0.5"},
        {"image": png_bytes(320, 256)},
    ),
    "inpaint-image": (
        {"steps": "10"},
        {"image": png_bytes(256, 320), "mask": mask_bytes(256, 320)},
    ),
}


@pytest.mark.parametrize("endpoint", list(REQUESTS))
def test_every_endpoint_queued_in_progress_complete(make_server, endpoint: str) -> None:
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.04", "SD_SIM_LOAD_SECONDS": "0.2"})
    fields, files = REQUESTS[endpoint]
    resp = server.post_form(endpoint, fields, files)
    assert resp.status == 303, resp.body
    location = resp.headers["Location"]
    # The POST's body is the status document of the new job: next in the queue (position 1),
    # or already taken by the idle worker (0).
    body = resp.json()
    queued = {"status": "QUEUED", "resultUrl": location, "imageUrls": [], "images": []}
    assert body == {**queued, "position": 1} or body == {**queued, "position": 0}
    docs = list(server.poll(location, {"COMPLETE", "FAILED"}))
    statuses = [d["status"] for d in docs]
    # In order, each seen: QUEUED (while the script loads), IN_PROGRESS, COMPLETE.
    assert statuses[0] == "QUEUED" and statuses[-1] == "COMPLETE", docs[-1]
    first_running = statuses.index("IN_PROGRESS")
    assert set(statuses[:first_running]) == {"QUEUED"}
    assert set(statuses[first_running:-1]) == {"IN_PROGRESS"}
    fractions = [d["progress"]["currentImageProgress"] for d in docs if "progress" in d]
    assert any(0 < f < 1 for f in fractions), fractions
    progress_never_backwards(docs)
    (image,) = fetch_pngs(server, docs[-1])
    assert (
        image.size
        == {"text-to-image": (256, 256), "image-to-image": (320, 256), "inpaint-image": (256, 320)}[
            endpoint
        ]
    )


def test_image_served_with_etag_and_long_caching(shared_server: Server) -> None:
    resp = shared_server.post_form("text-to-image", {"prompt": "cache me", "steps": "2"})
    doc = shared_server.wait_status(resp.headers["Location"], {"COMPLETE"})
    url = doc["imageUrls"][0]
    first = shared_server.get(url)
    assert first.status == 200
    etag = first.headers["ETag"]
    assert "immutable" in first.headers["Cache-Control"]
    again = shared_server.get(url, headers={"If-None-Match": etag})
    assert again.status == 304
    assert again.body == b""
    assert shared_server.get(url.replace("/1.png", "/2.png")).status == 404


def test_image_to_image_end_to_end(shared_server: Server) -> None:
    resp = shared_server.post_form(
        "image-to-image",
        {"prompt": "make it autumn", "steps": "8", "strength": "0.5", "iterations": "2"},
        {"image": png_bytes(300, 290)},
    )
    assert resp.status == 303, resp.body
    doc = shared_server.wait_status(resp.headers["Location"], {"COMPLETE", "FAILED"})
    assert doc["status"] == "COMPLETE", doc
    images = fetch_pngs(shared_server, doc)
    # The server cuts the init image down to multiples of 64 (the UNet needs them).
    assert [image.size for image in images] == [(256, 256)] * 2


def test_inpaint_end_to_end(shared_server: Server) -> None:
    resp = shared_server.post_form(
        "inpaint-image",
        {"steps": "10"},
        {"image": png_bytes(320, 256), "mask": mask_bytes(320, 256)},
    )
    assert resp.status == 303, resp.body
    doc = shared_server.wait_status(resp.headers["Location"], {"COMPLETE", "FAILED"})
    assert doc["status"] == "COMPLETE", doc
    (image,) = fetch_pngs(shared_server, doc)
    assert image.size == (320, 256)


def test_inpaint_seed_reaches_the_script(shared_server: Server) -> None:
    files = {"image": png_bytes(256, 256, (30, 90, 160)), "mask": mask_bytes(256, 256)}
    urls = [
        shared_server.post_form("inpaint-image", {"steps": "4", "seed": seed}, files).headers[
            "Location"
        ]
        for seed in ("1", "2", "1")
    ]
    assert urls[0] == urls[2] != urls[1]
    docs = [shared_server.wait_status(url, {"COMPLETE"}) for url in urls[:2]]
    first, second = (shared_server.get(doc["imageUrls"][0]).body for doc in docs)
    assert first != second


def test_json_and_urlencoded_bodies_make_the_same_job(shared_server: Server) -> None:
    fields = {"prompt": "same job", "steps": "5", "seed": "3"}
    form = shared_server.post_form("text-to-image", fields)
    encoded = shared_server.request(
        "POST",
        "/text-to-image",
        urlencode(fields).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    as_json = shared_server.post_json(
        "text-to-image", {"prompt": "same job", "steps": 5, "seed": 3}
    )
    locations = {r.headers["Location"] for r in (form, encoded, as_json)}
    assert len(locations) == 1, locations


def test_same_request_is_deduplicated_and_runs_once(make_server, tmp_path: Path) -> None:
    argv_log = tmp_path / "argv.jsonl"
    server = make_server(env={"SD_SIM_ARGV_LOG": str(argv_log)})
    fields = {"prompt": "only once", "steps": "4"}
    first = server.post_form("text-to-image", fields)
    second = server.post_form("text-to-image", fields)
    assert first.headers["Location"] == second.headers["Location"]
    server.wait_status(first.headers["Location"], {"COMPLETE"})
    third = server.post_form("text-to-image", fields)
    assert third.status == 303
    assert third.json()["status"] == "COMPLETE"
    different = server.post_form("text-to-image", {**fields, "seed": "43"})
    assert different.headers["Location"] != first.headers["Location"]
    server.wait_status(different.headers["Location"], {"COMPLETE"})
    runs = [json.loads(line) for line in argv_log.read_text().splitlines()]
    # The resident worker's warm-up at start is a run of the script too (its own prompt).
    ours = [run for run in runs if "--prompt=only once" in run["argv"]]
    assert len(ours) == 2, runs


def test_script_failure_is_reported_and_queue_moves_on(make_server) -> None:
    server = make_server(env={"SD_SIM_FAIL_AT_STEP": "6"})
    failing = server.post_form(
        "text-to-image", {"prompt": "fails", "steps": "4", "iterations": "3"}
    ).headers["Location"]
    fine = server.post_form("text-to-image", {"prompt": "fine", "steps": "4"}).headers["Location"]
    doc = server.wait_status(failing, {"FAILED", "COMPLETE"})
    assert doc["status"] == "FAILED"
    assert doc["error"] == (
        "RuntimeError: simulated failure at step 6 (the script exited with status 1)"
    )
    # Step 6 is in the second image: the first one was finished and stays listed.
    assert doc["imageUrls"] == [f"{failing}/1.png"]
    assert server.get(f"{failing}/1.png").status == 200
    # FAIL_AT_STEP applies to every run, but a 4-step job never reaches step 6.
    assert server.wait_status(fine, {"FAILED", "COMPLETE"})["status"] == "COMPLETE"


def both_running(server: Server, urls: list[str], timeout: float = 20.0) -> bool:
    """Whether the jobs were ever IN_PROGRESS at the same time before all completed."""
    deadline = time.monotonic() + timeout
    overlap = False
    while time.monotonic() < deadline:
        statuses = [server.get(url).json()["status"] for url in urls]
        overlap |= statuses.count("IN_PROGRESS") == len(urls)
        if all(s == "COMPLETE" for s in statuses):
            return overlap
        time.sleep(0.01)
    raise AssertionError("jobs did not complete")


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency(make_server, concurrency: int) -> None:
    server = make_server(
        args=["--concurrency", str(concurrency)],
        env={"SD_SIM_STEP_SECONDS": "0.05", "SD_SIM_LOAD_SECONDS": "0.05"},
    )
    urls = [
        server.post_form("text-to-image", {"prompt": f"job {n}", "steps": "12"}).headers["Location"]
        for n in range(2)
    ]
    assert both_running(server, urls) is (concurrency == 2)


def test_unknown_job_is_404_json(shared_server: Server) -> None:
    resp = shared_server.get("/text-to-image/" + "0" * 32)
    assert resp.status == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_missing_checkpoint_is_503_for_that_endpoint(make_server, tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    server = make_server(args=["--inpaint-image-model", str(missing)])
    assert "inpaint-image model checkpoint not found" in server.log()
    resp = server.post_form(
        "inpaint-image", {}, {"image": png_bytes(256, 256), "mask": mask_bytes(256, 256)}
    )
    assert resp.status == 503
    assert str(missing) in resp.json()["error"]["message"]
    ok = server.post_form("text-to-image", {"prompt": "still works", "steps": "2"})
    assert ok.status == 303
