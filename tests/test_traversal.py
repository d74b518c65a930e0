"""Only job status and finished `<n>.png` images are served: no other file of the output folder,
whatever the spelling of the path, and no file reached through a link."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Server, png_bytes


@pytest.fixture(scope="module")
def finished(shared_server: Server) -> Iterator[tuple[Server, str]]:
    """A completed image-to-image job (it has an input file on disk, too)."""
    resp = shared_server.post_form(
        "image-to-image", {"prompt": "traversal", "steps": "2"}, {"image": png_bytes(256, 256)}
    )
    location = resp.headers["Location"]
    assert shared_server.wait_status(location, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    yield shared_server, location


def not_served(server: Server, path: str) -> None:
    resp = server.get(path)
    assert resp.status == 404, (path, resp.status, resp.body[:200])
    assert resp.json()["error"]["code"] == "not_found"


JOB_RELATIVE = [
    "job.json",
    "job.log",
    "inputs/image.png",
    "inputs",
    "run",
    "0.png",
    "01.png",
    "1.PNG",
    "1.png/",
    "1.png.json",
    "-1.png",
    "1.png%00",
    "%31.png/..",
    "..%2fjob.json",
    "%2e%2e/%2e%2e/demo-key.pem",
    "1.png/../job.json",
]

ROOT_RELATIVE = [
    "/demo-key.pem",
    "/demo-cert.pem",
    "/.queue",
    "/.quarantine",
    "/.cursor-key",
    "/.index.sqlite3",
    "/image-to-image",
    "/image-to-image/",
    "/image-to-image/..%2f..%2fetc%2fpasswd",
    "/image-to-image/%2e%2e/%2e%2e/etc/passwd",
    "/image-to-image/%252e%252e/%252e%252e/etc/passwd",
    "/image-to-image/..%5c..%5cetc%5cpasswd",
    "/..%2f..%2fetc/passwd",
    "//etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/./././etc/passwd",
    "/%ff%fe",
    "/image-to-image/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    "/image-to-image/%00",
]


@pytest.mark.parametrize("relative", JOB_RELATIVE)
def test_nothing_else_of_a_job_folder_is_served(
    finished: tuple[Server, str], relative: str
) -> None:
    server, location = finished
    assert server.get(f"{location}/1.png").status == 200
    not_served(server, f"{location}/{relative}")


@pytest.mark.parametrize("path", ROOT_RELATIVE)
def test_nothing_outside_the_routes_is_served(finished: tuple[Server, str], path: str) -> None:
    server, _ = finished
    if path == "/image-to-image":
        # The POST route exists; a GET of it is the wrong method, never a folder listing.
        assert server.get(path).status == 405
        return
    not_served(server, path)


def test_ids_must_be_32_lowercase_hex(finished: tuple[Server, str]) -> None:
    server, location = finished
    job_id = location.rsplit("/", 1)[1]
    for wrong in (job_id.upper(), job_id[:-1], job_id + "0", f"{job_id[:-1]}g"):
        not_served(server, f"/image-to-image/{wrong}")
        not_served(server, f"/image-to-image/{wrong}/1.png")
    not_served(server, f"/image-to-image%2F{job_id}")
    not_served(server, f"/image-to-image/{job_id}%2F1.png")
    # The same id under another endpoint is another (missing) job.
    not_served(server, f"/text-to-image/{job_id}/1.png")


def finish_job(server: Server, prompt: str) -> str:
    location = server.post_form("text-to-image", {"prompt": prompt, "steps": "2"}).headers[
        "Location"
    ]
    assert server.wait_status(location, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    assert server.get(f"{location}/1.png").status == 200
    return location


def test_an_image_replaced_by_a_link_is_not_followed(shared_server: Server, tmp_path: Path) -> None:
    server, location = shared_server, finish_job(shared_server, "linked image")
    secret = tmp_path / "outside.png"
    secret.write_bytes(png_bytes(64, 64, (1, 2, 3)))
    image = server.output / location.strip("/") / "1.png"
    image.unlink()
    image.symlink_to(secret)
    not_served(server, f"{location}/1.png")


def test_a_job_folder_moved_out_behind_a_link_is_not_served(
    shared_server: Server, tmp_path: Path
) -> None:
    location = finish_job(shared_server, "moved away")
    folder = shared_server.output / location.strip("/")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder, elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    not_served(shared_server, f"{location}/1.png")


def test_a_job_folder_that_is_a_link_is_never_read_nor_written_through(
    make_server, tmp_path: Path
) -> None:
    server: Server = make_server()
    location = finish_job(server, "behind a link")
    server.stop()
    folder = server.output / location.strip("/")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder, elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()}

    server = make_server(output=server.output)  # finished jobs are read on first request
    not_served(server, location)
    not_served(server, f"{location}/1.png")
    (moved,) = (server.output / ".quarantine").iterdir()
    assert moved.is_symlink() and not folder.exists()
    # The same request makes the job anew in a real folder; the link's target is untouched.
    again = finish_job(server, "behind a link")
    assert again == location and not folder.is_symlink()
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()} == before


def test_an_endpoint_folder_that_is_a_link_is_moved_away_at_start(
    make_server, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = tmp_path / "output"
    output.mkdir()
    (output / "text-to-image").symlink_to(elsewhere, target_is_directory=True)
    server: Server = make_server(output=output)
    assert "an endpoint folder is a link" in server.log()
    finish_job(server, "not through the link")
    assert list(elsewhere.iterdir()) == []
    assert (output / "text-to-image").is_dir() and not (output / "text-to-image").is_symlink()
