"""A damaged job index is made again from the sidecars, whenever the damage is found (issue 17):
the file really damaged as the issue found it (a page of one of its indexes overwritten, bytes
changed inside a stored item, a folder in its place), then a real server asked for its
listings: each is answered, never a 500, and lists every job, new ones included."""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.jobfolders import generate
from helpers import Server, wait_until

JOBS = 240  # enough for several leaf pages in each of the index's own indexes


def every_item(server: Server, query: str = "") -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    path = f"/jobs?limit=37{query}"
    while True:
        resp = server.get(path)
        assert resp.status == 200, resp.body
        doc = resp.json()
        items += doc["items"]
        if doc["nextCursor"] is None:
            return items
        path = f"/jobs?limit=37{query}&cursor={doc['nextCursor']}"


def urls(items: list[dict[str, Any]]) -> list[str]:
    return [item["resultUrl"] for item in items]


def stopped_with_an_index(make_server: Callable[..., Server]) -> tuple[Server, list[str]]:
    """A server that built its index over JOBS finished jobs and was stopped in order (so the
    next start trusts the file: the index is marked clean); and the jobs' URLs, newest first."""
    output = make_server(start=False).output
    made = generate(output, JOBS, 0)
    server = make_server(output=output)
    listed = urls(every_item(server))
    assert sorted(listed) == sorted(f"/{e}/{i}" for e, i in made.finished)
    assert server.stop() == 0
    return server, listed


def index_file(server: Server) -> Path:
    return server.output / ".index.sqlite3"


def leaf_pages(index: Path, name: str) -> tuple[list[int], int]:
    """The leaf pages of the table or index `name` in the file, and the page size."""
    with contextlib.closing(sqlite3.connect(index)) as db:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
            (name,),
        ).fetchall()
    return [n for (n,) in pages], size


def overwrite_a_page(index: Path, name: str) -> None:
    pages, size = leaf_pages(index, name)
    assert len(pages) >= 2, f"{name} has one page only: the test needs more jobs"
    with index.open("r+b") as file:
        file.seek((pages[len(pages) // 2] - 1) * size)
        file.write(random.Random(17).randbytes(size))


def check_serving_every_job(
    make_server: Callable[..., Server], server: Server, listed: list[str], queries: list[str]
) -> Server:
    """Start again on the damaged index: every listing answered in full, a new job listed."""
    server = make_server(output=server.output)
    for query in queries:  # every job is finished: each query lists them all
        assert urls(every_item(server, query)) == listed, query
    resp = server.post_form("text-to-image", {"prompt": "after the repair", "steps": "2"})
    assert resp.status == 303, resp.body
    new = resp.headers["Location"]
    assert urls(every_item(server)) == [new, *listed]
    assert "Traceback" not in server.log()
    return server


def complete_ones(server: Server) -> list[str]:
    return [item["resultUrl"] for item in every_item(server) if item["status"] == "COMPLETE"]


def test_random_bytes_over_a_page_of_jobs_newest(make_server: Callable[..., Server]) -> None:
    server, listed = stopped_with_an_index(make_server)
    overwrite_a_page(index_file(server), "jobs_newest")
    server = check_serving_every_job(
        make_server, server, listed, ["", "&status=complete,failed,canceled"]
    )
    assert "making it again" in server.log()


def test_random_bytes_over_a_page_of_jobs_by_status(make_server: Callable[..., Server]) -> None:
    server, listed = stopped_with_an_index(make_server)
    overwrite_a_page(index_file(server), "jobs_by_status")
    server = make_server(output=server.output)
    complete = complete_ones(server)
    assert complete and urls(every_item(server, "&status=complete")) == complete
    assert urls(every_item(server, "&status=running,complete")) == complete
    assert urls(every_item(server)) == listed
    assert "Traceback" not in server.log()


def test_bytes_changed_inside_a_stored_item(make_server: Callable[..., Server]) -> None:
    server, listed = stopped_with_an_index(make_server)
    index = index_file(server)
    data = index.read_bytes()
    job_id = listed[5].rsplit("/", 1)[1]
    start = data.find(f'{{"id":"{job_id}"'.encode())
    assert start >= 0 and data.count(f'{{"id":"{job_id}"'.encode()) == 1
    with index.open("r+b") as file:  # 14 bytes, well inside the item: JSON no more
        file.seek(start + 60)
        file.write(b'"{[:,}]"{[:,}]')
    server = make_server(output=server.output)
    # The page holding it, then every page: answered, every job listed as it is on disk.
    first = server.get("/jobs?limit=10")
    assert first.status == 200 and urls(first.json()["items"]) == listed[:10]
    assert urls(every_item(server)) == listed
    item = next(i for i in every_item(server) if i["resultUrl"] == listed[5])
    assert item == {**item, **server.get(listed[5]).json()}
    assert "damaged" in server.log() and "Traceback" not in server.log()


def test_a_folder_where_the_index_should_be(make_server: Callable[..., Server]) -> None:
    server, listed = stopped_with_an_index(make_server)
    index = index_file(server)
    for path in (index, Path(f"{index}-wal"), Path(f"{index}-shm")):
        path.unlink(missing_ok=True)
    index.mkdir()
    server = check_serving_every_job(make_server, server, listed, [""])
    assert index.is_file()
    quarantined = list((server.output / ".quarantine").iterdir())
    assert [p.name.startswith("index.sqlite3-") and p.is_dir() for p in quarantined] == [True]
    # And again after a clean stop: nothing left to repair.
    assert server.stop() == 0
    server = make_server(output=server.output)
    assert len(every_item(server)) == JOBS + 1


def test_an_index_that_cannot_be_made_is_a_503_until_it_can(
    make_server: Callable[..., Server],
) -> None:
    """A folder in the index's place that cannot be moved aside (the quarantine's own place is
    a file): GET /jobs says so with a 503 and a Retry-After, everything else serves, and the
    listing comes back by itself once the way is clear."""
    server, listed = stopped_with_an_index(make_server)
    index = index_file(server)
    index.unlink()
    index.mkdir()
    blocker = server.output / ".quarantine"
    blocker.write_text("in the way")
    server = make_server(output=server.output)
    resp = server.get("/jobs")
    assert resp.status == 503, resp.body
    assert resp.json()["error"]["code"] == "index_unavailable"
    assert int(resp.headers["Retry-After"]) >= 1
    posted = server.post_form("text-to-image", {"prompt": "while it is down", "steps": "2"})
    assert posted.status == 303, posted.body
    assert server.get(listed[0]).status == 200
    blocker.unlink()
    wait_until(lambda: server.get("/jobs").status == 200, "the listing to come back")
    assert urls(every_item(server)) == [posted.headers["Location"], *listed]
    assert "Traceback" not in server.log()


def test_a_sidecar_whose_times_cannot_be_shown_is_quarantined_not_a_500(
    make_server: Callable[..., Server],
) -> None:
    """A sidecar that reads as JSON but holds a time no date can show (a year past 9999, a
    string, infinity) was taken as a job, then failed as its row was made, inside the
    reconciliation's transaction: every GET /jobs was a 500 from then on. Such a sidecar is
    corrupt: quarantined, and every other job listed."""
    output = make_server(start=False).output
    made = generate(output, 12, 0)
    bad = {made.finished[2]: ("startedAt", 1e12), made.finished[5]: ("finishedAt", "noon")}
    bad[made.finished[8]] = ("createdAt", float("inf"))
    for (endpoint, job_id), (name, value) in bad.items():
        sidecar = output / endpoint / job_id / "job.json"
        doc = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**doc, name: value}))
    server = make_server(output=output)
    good = [f"/{e}/{i}" for e, i in made.finished if (e, i) not in bad]
    assert sorted(urls(every_item(server))) == sorted(good)
    # A change written after it, then listed: the index still works.
    resp = server.post_form("text-to-image", {"prompt": "after the bad sidecars", "steps": "2"})
    assert resp.status == 303, resp.body
    assert sorted(urls(every_item(server))) == sorted([resp.headers["Location"], *good])

    def all_quarantined() -> bool:
        place = server.output / ".quarantine"
        return place.is_dir() and len(list(place.iterdir())) == len(bad)

    wait_until(all_quarantined, "the bad sidecars to be quarantined")
    assert "Traceback" not in server.log()
