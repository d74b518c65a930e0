"""GET /jobs and queue positions: the query (pure), filters and pages over real HTTPS,
pagination that stays stable while jobs arrive, positions in the listing and in the status GET
after a cancel and after a restart, and the index after restarts, crashes and outside changes."""

from __future__ import annotations

import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sd_rest.errors import ApiError
from sd_rest.jobs.listing import (
    DEFAULT_LIMIT,
    decode_cursor,
    encode_cursor,
    parse_query,
    seal,
)
from sd_rest.state.cursorkey import load_cursor_key
from sd_rest.state.items import iso_time
from sd_rest.state.jobs import Status
from sd_rest.state.layout import Layout

from bench.jobfolders import generate
from helpers import Server

KEY = b"k" * 32

# --- the query, pure ---------------------------------------------------------------------------


def test_the_query_defaults_and_filters() -> None:
    query = parse_query({}, KEY)
    assert query.limit == DEFAULT_LIMIT == 50
    assert query.statuses == frozenset(Status) and query.after is None
    query = parse_query([("status", "queued,FAILED"), ("status", "running"), ("limit", "500")], KEY)
    assert query.statuses == {Status.QUEUED, Status.FAILED, Status.IN_PROGRESS}
    assert query.stored_statuses() == {Status.QUEUED, Status.FAILED, Status.IN_PROGRESS}
    assert parse_query({"status": "queued"}, KEY).stored_statuses() == {
        Status.QUEUED,
        Status.IN_PROGRESS,  # a job whose script loads reads QUEUED
    }
    assert parse_query({"endpoint": "inpaint-image"}, KEY).endpoints == {"inpaint-image"}
    assert parse_query({"limit": "0" * 5000 + "7"}, KEY).limit == 7


@pytest.mark.parametrize(
    ("pairs", "field", "code"),
    [
        ([("limit", "0")], "limit", "invalid_field"),
        ([("limit", "501")], "limit", "invalid_field"),
        ([("limit", "ten")], "limit", "invalid_field"),
        ([("limit", "-1")], "limit", "invalid_field"),
        ([("limit", "5"), ("limit", "6")], "limit", "duplicate_field"),
        ([("status", "done")], "status", "invalid_field"),
        ([("status", "queued,")], "status", "invalid_field"),
        ([("endpoint", "txt2img")], "endpoint", "invalid_field"),
        ([("cursor", "abc")], "cursor", "invalid_field"),
        (
            [("cursor", encode_cursor((1.0, "text-to-image", "x" * 32), KEY))],
            "cursor",
            "invalid_field",
        ),
        ([("limit", "9" * 5000)], "limit", "invalid_field"),  # int() refuses: was a 500
        ([("page", "2")], "page", "unknown_field"),
    ],
)
def test_bad_query_parameters_are_named(
    pairs: list[tuple[str, str]], field: str, code: str
) -> None:
    with pytest.raises(ApiError) as caught:
        parse_query(pairs, KEY)
    assert caught.value.status == 400
    assert (caught.value.field, caught.value.code) == (field, code)


def test_the_cursor_round_trips_exactly() -> None:
    place = (1_750_000_123.456789, "image-to-image", "ab" * 16)
    assert decode_cursor(encode_cursor(place, KEY), KEY) == place
    assert "=" not in encode_cursor(place, KEY)


@pytest.mark.parametrize(
    "raw",
    [
        b'["0x1.0p+0",["text-to-image"],"' + b"ab" * 16 + b'"]',  # was unhashable: a 500
        b'["0x1.0p+0",{},"' + b"ab" * 16 + b'"]',
        b"[" * 3000,  # was a RecursionError
        b'["0x1.0p+0","text-to-image","' + b"ab" * 16 + b'\\n"]',  # `$` took the newline
        b'["nan","text-to-image","' + b"ab" * 16 + b'"]',
        b'["0x1.0p+0","text-to-image","' + b"ab" * 16 + b'",1]',
        b'{"a":1}',
        b"\xff\xfe",
    ],
)
def test_a_signed_cursor_that_is_no_place_is_refused(raw: bytes) -> None:
    """Signed (a key that leaked, an older format): still read with care, never a 500."""
    with pytest.raises(ApiError) as refused:
        decode_cursor(seal(raw, KEY), KEY)
    assert (refused.value.status, refused.value.field) == (400, "cursor")


def test_a_cursor_another_key_signed_or_changed_is_refused() -> None:
    cursor = encode_cursor((1_750_000_000.5, "text-to-image", "ab" * 16), KEY)
    changed = cursor[:5] + ("A" if cursor[5] != "A" else "B") + cursor[6:]
    for text in (encode_cursor((1.5, "text-to-image", "ab" * 16), b"x" * 32), changed, cursor[:-3]):
        with pytest.raises(ApiError) as refused:
            decode_cursor(text, KEY)
        assert refused.value.field == "cursor"
    with pytest.raises(ApiError):
        decode_cursor("A" * 5000, KEY)


def test_the_cursor_key_is_kept_beside_the_index(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "output")
    key = load_cursor_key(layout)
    path = layout.cursor_key_file
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_cursor_key(layout) == key  # the same after a restart
    path.chmod(0o644)
    assert load_cursor_key(layout) == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_bytes(b"short")  # damaged: a new one
    other = load_cursor_key(layout)
    assert other != key and len(other) == 32 and path.read_bytes() == other
    path.unlink()
    path.mkdir()  # no plain file: moved to the quarantine, a new key made
    (path / "inside").write_text("kept for a person to see")
    new = load_cursor_key(layout)
    assert path.read_bytes() == new and len(new) == 32
    quarantined = list(layout.quarantine_dir.iterdir())
    assert [(p.name.startswith("cursor-key-"), (p / "inside").exists()) for p in quarantined] == [
        (True, True)
    ]


def test_times_are_iso_8601_utc() -> None:
    assert iso_time(0.5) == "1970-01-01T00:00:00.500Z"
    assert iso_time(None) is None


# --- over HTTPS ----------------------------------------------------------------------------------


def post(server: Server, fields: dict[str, str], endpoint: str = "text-to-image") -> str:
    resp = server.post_form(endpoint, fields)
    assert resp.status == 303, resp.body
    return resp.headers["Location"]


def page(server: Server, query: str = "") -> dict[str, Any]:
    resp = server.get(f"/jobs{query}")
    assert resp.status == 200, resp.body
    return resp.json()


def every_page(server: Server, query: str, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    doc = page(server, f"?limit={limit}{query}")
    while True:
        items += doc["items"]
        assert len(doc["items"]) <= limit
        if doc["nextCursor"] is None:
            return items
        doc = page(server, f"?limit={limit}{query}&cursor={doc['nextCursor']}")


def positions(server: Server) -> dict[str, int]:
    doc = page(server, "?status=queued")
    return {item["resultUrl"]: item["position"] for item in doc["items"]}


def test_filters_items_and_positions(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.02"})
    done = post(server, {"prompt": "finished one", "steps": "2"})
    server.wait_status(done, {"COMPLETE"})
    running = post(server, {"prompt": "long one", "steps": "250"})
    server.wait_status(running, {"IN_PROGRESS"})
    waiting = [post(server, {"prompt": f"waiting {n}", "steps": "2"}) for n in range(4)]
    listing = page(server)
    assert [item["resultUrl"] for item in listing["items"]] == [*reversed(waiting), running, done]
    assert listing["nextCursor"] is None
    first = listing["items"][-1]
    assert first["status"] == "COMPLETE" and first["params"]["prompt"] == "finished one"
    assert first["createdAt"] <= first["startedAt"] <= first["finishedAt"]
    assert "position" not in first
    assert listing["items"][-2]["status"] == "IN_PROGRESS" and "progress" in listing["items"][-2]
    assert positions(server) == {url: n for n, url in enumerate(waiting, 1)}
    for n, url in enumerate(waiting, 1):
        doc = server.get(url).json()
        queued = {"status": "QUEUED", "resultUrl": url, "imageUrls": [], "images": []}
        assert doc == {**queued, "position": n}
    # Every item is the status document plus what identifies the job.
    for item in listing["items"]:
        doc = server.get(item["resultUrl"]).json()
        assert {k: v for k, v in item.items() if k in doc} == doc | (
            {"progress": item["progress"]} if "progress" in doc else {}
        )
    # A cancel moves the ones behind it up; the status GET says the same.
    assert server.request("DELETE", waiting[1]).status == 200
    assert positions(server) == {waiting[0]: 1, waiting[2]: 2, waiting[3]: 3}
    assert server.get(waiting[3]).json()["position"] == 3
    assert "position" not in server.get(waiting[1]).json()
    assert [i["resultUrl"] for i in page(server, "?status=canceled")["items"]] == [waiting[1]]
    assert [i["resultUrl"] for i in page(server, "?status=running")["items"]] == [running]
    assert [i["resultUrl"] for i in page(server, "?status=complete,running")["items"]] == [
        running,
        done,
    ]
    assert page(server, "?endpoint=inpaint-image")["items"] == []
    assert len(page(server, "?endpoint=text-to-image&status=queued")["items"]) == 3
    bad = server.get("/jobs?status=running&limit=9999")
    assert bad.status == 400 and bad.json()["error"]["field"] == "limit"
    assert server.get("/jobs?page=2").json()["error"]["field"] == "page"
    server.request("DELETE", running)


def test_pages_stay_stable_while_jobs_arrive(make_server: Callable[..., Server]) -> None:
    output = make_server(start=False).output
    made = generate(output, 57, 0)
    server = make_server(
        output=output, args=["--max-queue", "500"], env={"SD_SIM_LOAD_SECONDS": "5"}
    )
    known = [f"/{endpoint}/{job_id}" for endpoint, job_id in reversed(made.finished)]
    stop = threading.Event()
    posted: list[str] = []

    def keep_posting() -> None:
        n = 0
        while not stop.is_set():
            posted.append(post(server, {"prompt": f"arriving {n}", "steps": "2"}))
            n += 1

    poster = threading.Thread(target=keep_posting, daemon=True)
    poster.start()
    try:
        wait_for = time.monotonic() + 10
        while not posted and time.monotonic() < wait_for:
            time.sleep(0.01)
        seen = every_page(server, "", 7)
    finally:
        stop.set()
        poster.join(30)
    urls = [item["resultUrl"] for item in seen]
    assert len(urls) == len(set(urls)), "an item was repeated"
    # Every job that existed when the first page was read is there, in order, newest first.
    assert urls[-len(known) :] == known
    created = [item["createdAt"] for item in seen]
    assert created == sorted(created, reverse=True)
    assert len(posted) >= 2
    finished = every_page(server, "&status=complete,failed,canceled", 500)
    assert {item["resultUrl"] for item in finished} == set(known)


def test_positions_and_listing_after_a_restart(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.05"})
    done = post(server, {"prompt": "before the restart", "steps": "2"})
    server.wait_status(done, {"COMPLETE"})
    running = post(server, {"prompt": "interrupted", "steps": "250"})
    server.wait_status(running, {"IN_PROGRESS"})
    waiting = [post(server, {"prompt": f"still waiting {n}", "steps": "2"}) for n in range(3)]
    server.request("DELETE", waiting[0])
    before = page(server)["items"]
    assert server.stop() == 0
    again = make_server(output=server.output, env={"SD_SIM_LOAD_SECONDS": "30"})
    after = page(again)["items"]
    assert [i["resultUrl"] for i in after] == [i["resultUrl"] for i in before]
    # The interrupted job resumes first (its script is loading: position 0), then the others
    # in the order they were posted.
    assert positions(again) == {running: 0, waiting[1]: 1, waiting[2]: 2}
    assert again.get(waiting[2]).json()["position"] == 2
    statuses = {i["resultUrl"]: i["status"] for i in after}
    assert statuses[done] == "COMPLETE" and statuses[waiting[0]] == "CANCELED"


def test_the_index_survives_crashes_and_outside_changes(make_server: Callable[..., Server]) -> None:
    output = make_server(start=False).output
    made = generate(output, 30, 0)
    server = make_server(output=output)
    urls = {f"/{endpoint}/{job_id}" for endpoint, job_id in made.finished}
    assert {i["resultUrl"] for i in every_page(server, "", 500)} == urls  # built on first start
    index = output / ".index.sqlite3"
    assert index.exists()
    new = post(server, {"prompt": "written to the index", "steps": "2"})
    server.wait_status(new, {"COMPLETE"})
    server.stop(signal.SIGKILL)  # the index is not closed in order: rebuilt from the sidecars
    gone = sorted(urls)[0]
    shutil.rmtree(output.joinpath(*gone.strip("/").split("/")))
    server = make_server(output=output)
    assert {i["resultUrl"] for i in every_page(server, "", 500)} == (urls - {gone}) | {new}
    assert "sidecar(s) read" in server.log()
    assert server.stop() == 0
    # A damaged index file is made again.
    index.write_bytes(b"this is not a database" * 100)
    for extra in (Path(f"{index}-wal"), Path(f"{index}-shm")):
        extra.unlink(missing_ok=True)
    server = make_server(output=output)
    assert {i["resultUrl"] for i in every_page(server, "", 500)} == (urls - {gone}) | {new}
    assert server.get("/.index.sqlite3").status == 404


def test_a_cursor_outlives_a_restart_and_one_from_another_server_is_refused(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    output = make_server(start=False).output
    generate(output, 30, 0)
    server = make_server(output=output)
    first = page(server, "?limit=10")
    second = page(server, f"?limit=10&cursor={first['nextCursor']}")
    assert server.stop() == 0
    server = make_server(output=output)
    assert page(server, f"?limit=10&cursor={first['nextCursor']}") == second
    other = make_server(output=tmp_path / "elsewhere" / "output")
    refused = other.get(f"/jobs?limit=10&cursor={first['nextCursor']}")
    assert refused.status == 400 and refused.json()["error"]["field"] == "cursor"


@pytest.mark.parametrize("digits", ["²", "1²", "٣"])
def test_digits_int_cannot_read_or_that_are_not_ascii_are_a_400_not_a_500(digits: str) -> None:
    # str.isdigit takes "²", which int() refuses: that was an internal error (found with
    # schemathesis' help, issue 12). The same in a Last-Event-ID and a stream token's expiry.
    from sd_rest.api.streams import parse_event_id
    from sd_rest.api.tokens import token_key, token_valid

    with pytest.raises(ApiError) as refused:
        parse_query([("limit", digits)], KEY)
    assert (refused.value.status, refused.value.field) == (400, "limit")
    assert parse_event_id(digits) is None
    assert not token_valid(token_key("k"), f"{digits}.nonce.signature", time.time())
