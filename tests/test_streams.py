"""Event streams over real HTTPS: every event and its order for each endpoint and outcome,
reconnections inside and outside the replay buffer, the end of a job's stream, a client that
stops reading, shutdown, the comment that keeps proxies open, auth and CORS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from helpers import Server, mask_bytes, png_bytes, wait_until
from sse import FINAL, Event, EventStream, job_events, names

KEY = "stream-test-key-0123456789"
IMAGE = png_bytes(256, 256)
MASK = mask_bytes(256, 256)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certs: tuple[str, str, str]) -> Server:
    output = tmp_path_factory.mktemp("streams") / "output"
    started = Server(output=output, certs=certs, env={"SD_SIM_STEP_SECONDS": "0.02"}).start()
    yield started
    if started.process is not None and started.process.poll() is None:
        started.kill()


def post(server: Server, endpoint: str, fields: dict[str, str], files: dict | None = None) -> str:
    resp = server.post_form(endpoint, fields, files)
    assert resp.status == 303, resp.body
    return resp.headers["Location"]


def blocker(server: Server, name: str) -> str:
    """A running job that keeps the next ones waiting until it is deleted."""
    url = post(
        server, "text-to-image", {"prompt": f"blocker {name} {time.time_ns()}", "steps": "250"}
    )
    server.wait_status(url, {"IN_PROGRESS"})
    return url


SUBMISSIONS: dict[str, tuple[dict[str, str], dict[str, bytes] | None, int]] = {
    "text-to-image": ({"prompt": "a tower", "iterations": "2", "steps": "6"}, None, 2),
    "image-to-image": ({"prompt": "autumn", "iterations": "2", "steps": "8"}, {"image": IMAGE}, 2),
    "inpaint-image": ({"steps": "6"}, {"image": IMAGE, "mask": MASK}, 1),
}


def check_run(events: list[Event], total: int, outcome: str) -> None:
    """A job's events from the moment a worker takes it: queued at position 0 while its script
    loads, started with its first progress, progress forward only, images 1..N in order, one
    final event, increasing ids."""
    assert [e.number for e in events] == sorted({e.number for e in events}), "ids increase"
    assert events[0].event == "queued" and events[0].data["position"] == 0, events[0]
    assert events[1].event == "started", names(events)
    progress = [
        (e.data["progress"]["currentImageIndex"], e.data["progress"]["currentImageProgress"])
        for e in events
        if e.event in ("started", "progress")
    ]
    assert progress == sorted(progress), progress
    assert all(e.data["progress"]["totalImages"] == total for e in events if "progress" in e.data)
    images = [e for e in events if e.event == "image"]
    if outcome == "complete":
        assert [e.data["number"] for e in images] == list(range(1, total + 1))
    for image in images:
        assert (
            image.data["url"]
            == f"/{image.data['endpoint']}/{image.data['id']}/{image.data['number']}.png"
        )
        assert isinstance(image.data["seed"], int)
    assert [e.event for e in events if e.event in FINAL] == [outcome]
    assert events[-1].event == outcome
    assert set(names(events)) <= {"queued", "started", "progress", "image", outcome}


def check_item(server: Server, url: str, item: dict[str, Any]) -> None:
    """A final event or snapshot carries the status document plus what the listing shows."""
    doc = server.get(url).json()
    endpoint, job_id = url.strip("/").split("/")
    assert item == {
        "id": job_id,
        "endpoint": endpoint,
        **doc,
        "createdAt": item["createdAt"],
        "startedAt": item["startedAt"],
        "finishedAt": item["finishedAt"],
        "params": item["params"],
    }
    assert item["createdAt"].endswith("Z")
    assert isinstance(item["params"], dict)


@pytest.mark.parametrize("endpoint", list(SUBMISSIONS))
def test_a_job_from_queued_to_complete(server: Server, endpoint: str) -> None:
    fields, files, total = SUBMISSIONS[endpoint]
    fields = {**fields, "seed": str(time.time_ns() % 1000)}
    first = blocker(server, endpoint)
    url = post(server, endpoint, fields, files)
    with EventStream(server, f"{url}/events") as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["Access-Control-Allow-Origin"] == "*"
        items = stream.items()
        assert next(items).retry == 2000  # once, first
        snapshot = next(items)
        assert snapshot.event == "snapshot"
        assert snapshot.data["status"] == "QUEUED" and snapshot.data["position"] == 1
        check_item(server, url, snapshot.data)
        assert server.request("DELETE", first).status == 200
        run = stream.rest()
    assert stream.ended
    assert run[0].number > snapshot.number
    check_run(run, total, "complete")
    check_item(server, url, run[-1].data)
    assert run[-1].data["status"] == "COMPLETE" and len(run[-1].data["imageUrls"]) == total
    assert all(e.retry is None for e in run)


def submission(endpoint: str, steps: int, name: str) -> tuple[dict[str, str], dict | None]:
    """Fields and files of a job of `endpoint` with `steps`, distinct by `name`."""
    fields, files, _ = SUBMISSIONS[endpoint]
    changed = {**fields, "steps": str(steps), "seed": str(time.time_ns() % 10**9)}
    if "prompt" in fields:
        changed["prompt"] = f"{name} {time.time_ns()}"
    return changed, files


def running_snapshot(event: Event) -> bool:
    return event.event == "snapshot" and event.data.get("status") == "IN_PROGRESS"


@pytest.mark.parametrize("endpoint", list(SUBMISSIONS))
def test_canceled_while_running_and_while_queued(server: Server, endpoint: str) -> None:
    running = post(server, endpoint, *submission(endpoint, 250, "cancel me"))
    waiting = post(server, endpoint, *submission(endpoint, 4, "cancel me too"))
    with (
        EventStream(server, f"{running}/events") as one,
        EventStream(server, f"{waiting}/events") as two,
    ):
        # Running: it may have started before this stream began (its snapshot says so then).
        one.until(lambda e: e.event in ("started", "progress") or running_snapshot(e))
        first = two.until(lambda e: e.event == "snapshot")[0]
        assert first.data["position"] == 1
        assert server.request("DELETE", waiting).status == 200
        # At once, while it surely runs (its 250 steps are seconds): then read what came.
        assert server.request("DELETE", running).status == 200
        canceled = two.rest()
        assert names(canceled) == ["canceled"]
        check_item(server, waiting, canceled[0].data)
        assert canceled[0].data["imageUrls"] == []
        rest = one.rest()
    assert rest[-1].event == "canceled" and rest[-1].data["status"] == "CANCELED"
    assert set(names(rest[:-1])) <= {"progress", "image"}
    check_item(server, running, rest[-1].data)


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory, certs: tuple[str, str, str]) -> Server:
    """Every script fails at its third sampler step, after a load long enough to connect."""
    output = tmp_path_factory.mktemp("failing") / "output"
    env = {"SD_SIM_FAIL_AT_STEP": "3", "SD_SIM_LOAD_SECONDS": "0.6"}
    started = Server(output=output, certs=certs, env=env).start()
    yield started
    if started.process is not None and started.process.poll() is None:
        started.kill()


@pytest.mark.parametrize("endpoint", list(SUBMISSIONS))
def test_a_failed_job(failing: Server, endpoint: str) -> None:
    fields, files = submission(endpoint, 6, "doomed")
    url = post(failing, endpoint, fields, files)
    with EventStream(failing, f"{url}/events") as stream:
        events = stream.rest()
    # Taken by the worker at once: the snapshot says it is starting (position 0).
    assert events[0].event == "snapshot" and events[0].data["position"] == 0
    assert names(events[1:2]) == ["started"]
    assert events[-1].event == "failed"
    assert set(names(events[2:-1])) <= {"progress"}
    assert "RuntimeError" in events[-1].data["error"]
    check_item(failing, url, events[-1].data)
    # Posted again, it is queued anew and its stream starts over.
    post(failing, endpoint, fields, files)
    with EventStream(failing, f"{url}/events") as stream:
        again = stream.rest()
    assert again[0].event == "snapshot" and again[-1].event == "failed"
    assert again[0].number > events[-1].number


def test_a_finished_job_gives_its_final_event_then_204(server: Server) -> None:
    url = post(server, "text-to-image", {"prompt": f"done {time.time_ns()}", "steps": "2"})
    server.wait_status(url, {"COMPLETE"})
    with EventStream(server, f"{url}/events") as stream:
        events = stream.rest()
    assert names(events) == ["complete"]
    check_item(server, url, events[0].data)
    # EventSource reconnects when a stream ends: told 204, it stops.
    with EventStream(server, f"{url}/events", {"Last-Event-ID": events[0].id or ""}) as again:
        assert again.status == 204


def run_in_thread(function: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    return thread, result


def test_reconnect_inside_the_buffer_gets_exactly_what_was_missed(server: Server) -> None:
    first = blocker(server, "reconnect")
    url = post(
        server,
        "text-to-image",
        {"prompt": f"reconnect {time.time_ns()}", "iterations": "3", "steps": "10"},
    )
    whole = EventStream(server, f"{url}/events")
    thread, result = run_in_thread(whole.rest)
    part = EventStream(server, f"{url}/events")
    before = part.until(lambda e: e.event == "snapshot")
    server.request("DELETE", first)
    before += part.until(lambda e: e.event == "image")
    part.close()
    last = before[-1].id
    with EventStream(server, f"{url}/events", {"Last-Event-ID": last or ""}) as again:
        after = again.rest()
    thread.join(30)
    whole.close()
    assert after and after[0].event != "snapshot"
    assert after[0].number > int(last or 0)
    # The two snapshots say the same of the job, but their ids may differ: a snapshot's id is
    # the newest event of any job (the blocker's progress goes on between the two requests).
    assert (before[0].event, before[0].data) == (result[0][0].event, result[0][0].data)
    assert before[0].event == "snapshot"
    assert [(e.id, e.event, e.data) for e in before[1:] + after] == [
        (e.id, e.event, e.data) for e in result[0][1:]
    ]
    # The same, from the query (a page that opens a new EventSource), once the job is done.
    middle = before[len(before) // 2]
    with EventStream(server, f"{url}/events?lastEventId={middle.id}") as late:
        replayed = late.rest()
    assert [e.id for e in replayed] == [e.id for e in result[0] if e.number > middle.number]


@pytest.mark.parametrize("last", ["1", "not-a-number", "99999999999999999999"])
def test_reconnect_outside_the_buffer_gets_one_snapshot(server: Server, last: str) -> None:
    first = blocker(server, f"outside {last}")
    url = post(
        server, "text-to-image", {"prompt": f"outside {last} {time.time_ns()}", "steps": "4"}
    )
    with EventStream(server, f"{url}/events", {"Last-Event-ID": last}) as stream:
        events = stream.until(lambda e: True)
        assert names(events) == ["snapshot"]
        assert events[0].data["status"] == "QUEUED" and events[0].data["position"] == 1
        server.request("DELETE", first)
        rest = stream.rest()
    check_run(rest, 1, "complete")


def test_every_job_on_one_stream(server: Server) -> None:
    first = blocker(server, "all")
    with EventStream(server, "/events") as stream:
        snapshot = stream.until(lambda e: e.event == "snapshot")[0]
        jobs = {job["resultUrl"]: job for job in snapshot.data["jobs"]}
        assert jobs[first]["status"] == "IN_PROGRESS"
        a = post(server, "text-to-image", {"prompt": f"all a {time.time_ns()}", "steps": "2"})
        b = post(
            server,
            "inpaint-image",
            {"steps": "2", "seed": str(time.time_ns() % 999)},
            {"image": IMAGE, "mask": MASK},
        )
        server.request("DELETE", first)
        ids = {url.rsplit("/", 1)[1] for url in (a, b)}
        done: set[str] = set()
        events = stream.until(
            lambda e: e.event == "complete" and done.add(e.data["id"]) is None and ids <= done
        )
    assert [e.number for e in events] == sorted({e.number for e in events})
    a_events = job_events(events, a.rsplit("/", 1)[1])
    b_events = job_events(events, b.rsplit("/", 1)[1])
    assert [e.data["position"] for e in a_events[:1]] == [1]
    assert [e.data["position"] for e in b_events[:1]] == [2]
    check_run(a_events[1:], 1, "complete")
    check_run(
        [e for e in b_events if not (e.event == "queued" and e.data["position"])], 1, "complete"
    )
    # Moves: b went from 2 to 1 when a was taken, then to 0.
    assert [e.data["position"] for e in b_events if e.event == "queued"] == [2, 1, 0]


def test_a_comment_keeps_an_idle_stream_open(make_server: Callable[..., Server]) -> None:
    quick = make_server(env={"SD_REST_STREAM_PING": "0.2"})
    with EventStream(quick, "/events") as stream:
        began = time.monotonic()
        comment = next(e for e in stream.items() if e.event == "comment")
    assert comment.comment == "ping"
    assert time.monotonic() - began < 10


def test_the_default_comment_interval_is_15_seconds() -> None:
    from sd_rest.settings import Limits, limits_from_environment

    assert Limits().stream_ping == 15.0
    assert limits_from_environment({}).stream_ping == 15.0
    with pytest.raises(ValueError, match="SD_REST_STREAM_BUFFER"):
        limits_from_environment({"SD_REST_STREAM_BUFFER": "12"})


def stalled_client(server: Server, path: str, headers: str = "") -> ssl.SSLSocket:
    """Asks for a stream, then never reads: its receive buffer is made small first."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", server.port))
    sock = server.context().wrap_socket(raw, server_hostname="localhost")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
    return sock


def read_until_closed(sock: ssl.SSLSocket, timeout: float = 20.0) -> tuple[bytes, bool]:
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return received, True
            received += chunk
    except (ConnectionError, ssl.SSLError):
        return received, True
    except TimeoutError:
        pass
    return received, False


def test_a_client_that_stops_reading_is_dropped_and_slows_nobody(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(env={"SD_REST_STREAM_BUFFER": "4096", "SD_SIM_LOAD_SECONDS": "30"})
    stalled = stalled_client(server, "/events")
    healthy = EventStream(server, "/events")
    healthy.until(lambda e: e.event == "snapshot")
    count = 50
    prompt = "a long prompt " * 60
    urls = [
        post(server, "text-to-image", {"prompt": f"{prompt}{n}", "steps": "1"})
        for n in range(count)
    ]
    ids = {url.rsplit("/", 1)[1] for url in urls}
    finished: set[str] = set()
    reader, result = run_in_thread(
        lambda: healthy.until(
            lambda e: e.event in FINAL and finished.add(e.data["id"]) is None and ids <= finished,
            timeout=120,
        )
    )
    # Each cancel from the front moves every job behind it: about 150 KB of events in all, far
    # beyond the stalled client's buffers (4 KB of its own, the server's socket and 4 KB).
    for url in urls:
        assert server.request("DELETE", url).status == 200
    reader.join(120)
    (events,) = result
    assert [e.number for e in events] == sorted({e.number for e in events})
    moves = [e for e in events if e.event == "queued"]
    assert len(moves) > count * count / 3
    wait_until(lambda: "dropped an event-stream client" in server.log(), "the drop", 30)
    data, closed = read_until_closed(stalled)
    assert closed, "the server closed the stalled client's connection"
    assert b"snapshot" in data and data.count(b"event: canceled") < count
    stalled.close()
    # The healthy client is still served.
    post(server, "text-to-image", {"prompt": "after the drop", "steps": "1"})
    assert healthy.until(lambda e: e.event == "queued" and e.data["position"] == 0)
    healthy.close()
    assert server.log().count("dropped an event-stream client") == 1


BIG_PROMPT = "\U0001f304" * 990  # 3,960 bytes of UTF-8: each job's item is over 4 KB
BIG_JOBS = 40  # about 170 KB of items: far beyond the buffers between server and client


def big_queue(make_server: Callable[..., Server]) -> tuple[Server, int, list[str]]:
    """A server whose first job loads for a minute while BIG_JOBS jobs with long prompts wait
    behind it; a 4 KiB stream buffer, a ping every second. Returns the server, the id of the
    newest event before the long jobs were posted, and their URLs."""
    server = make_server(
        env={
            "SD_REST_STREAM_BUFFER": "4096",
            "SD_REST_STREAM_PING": "1",
            "SD_SIM_LOAD_SECONDS": "60",
        }
    )
    post(server, "text-to-image", {"prompt": "loads for a minute", "steps": "1"})
    with EventStream(server, "/events") as stream:
        before = stream.until(lambda e: e.event == "snapshot")[-1].number
    urls = [
        post(server, "text-to-image", {"prompt": f"{BIG_PROMPT} {n}", "steps": "1"})
        for n in range(BIG_JOBS)
    ]
    return server, before, urls


def drops(server: Server) -> int:
    return server.log().count("dropped an event-stream client")


def test_a_client_that_never_reads_its_snapshot_is_dropped(
    make_server: Callable[..., Server],
) -> None:
    """The snapshot is far larger than the client buffer: a client that does not read it is
    dropped within a ping interval, once; one that reads gets all of it."""
    server, _, urls = big_queue(make_server)
    stalled = stalled_client(server, "/events")
    wait_until(lambda: drops(server) == 1, "the client that never reads to be dropped", 30)
    data, closed = read_until_closed(stalled)
    assert closed and len(data) < 100_000, len(data)
    stalled.close()
    with EventStream(server, "/events") as reader:
        snapshot = reader.until(lambda e: e.event == "snapshot")[-1]
    jobs = snapshot.data["jobs"]
    assert [job["resultUrl"] for job in jobs[1:]] == urls
    assert all(job["params"]["prompt"].startswith(BIG_PROMPT) for job in jobs[1:])
    server.assert_serving()
    assert drops(server) == 1


def test_a_client_that_never_reads_its_replay_is_dropped(
    make_server: Callable[..., Server],
) -> None:
    server, before, urls = big_queue(make_server)
    for url in urls:  # each `canceled` carries the job's whole item: its long prompt
        assert server.request("DELETE", url).status == 200
    stalled = stalled_client(server, "/events", f"Last-Event-ID: {before}\r\n")
    wait_until(lambda: drops(server) == 1, "the client that never reads to be dropped", 30)
    stalled.close()
    with EventStream(server, "/events", {"Last-Event-ID": str(before)}) as reader:
        ids = {url.rsplit("/", 1)[1] for url in urls}
        canceled: set[str] = set()
        events = reader.until(
            lambda e: (
                e.event == "canceled" and canceled.add(e.data["id"]) is None and canceled == ids
            )
        )
    assert "snapshot" not in names(events)
    assert [e.number for e in events] == sorted({e.number for e in events})
    server.assert_serving()
    assert drops(server) == 1


def test_shutdown_ends_streams_cleanly_and_a_restart_resumes_them(
    make_server: Callable[..., Server], tmp_path: Any
) -> None:
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.05"})
    url = post(
        server, "text-to-image", {"prompt": "across a restart", "iterations": "3", "steps": "8"}
    )
    one = EventStream(server, f"{url}/events")
    every = EventStream(server, "/events")
    seen = one.until(lambda e: e.event == "progress")
    every.until(lambda e: e.event == "snapshot")
    thread, rest_of_every = run_in_thread(every.rest)
    assert server.stop() == 0
    rest = one.rest()  # ended by the server with the chunked terminator: no error
    thread.join(10)
    assert len(rest_of_every) == 1, "the stream of every job ended without an error"
    assert one.ended and every.ended
    assert not [e for e in rest if e.event in FINAL]
    one.close()
    every.close()
    again = make_server(output=server.output)
    last = (seen + rest)[-1].id or ""
    with EventStream(again, f"{url}/events", {"Last-Event-ID": last}) as stream:
        events = stream.rest()
    assert events[0].event == "snapshot"  # another run of the server: its buffer has none
    assert events[0].number > int(last)
    assert events[-1].event == "complete" and len(events[-1].data["imageUrls"]) == 3


# --- auth and CORS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, certs: tuple[str, str, str]) -> Server:
    output = tmp_path_factory.mktemp("keyed-streams") / "output"
    started = Server(output=output, certs=certs, args=["--api-key", KEY])
    started.env = {}
    started.start(wait=False)
    deadline = time.monotonic() + 20
    while True:
        try:
            if started.get("/", {"Authorization": f"Bearer {KEY}"}).status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, started.log()
        time.sleep(0.05)
    yield started
    if started.process is not None and started.process.poll() is None:
        started.kill()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_streams_need_the_key_or_a_token(keyed: Server) -> None:
    body, ctype = __import__("helpers").multipart({"prompt": "keyed stream", "steps": "2"})
    resp = keyed.request("POST", "/text-to-image", body, {"Content-Type": ctype, **auth()})
    url = resp.headers["Location"]
    for path in ("/events", f"{url}/events"):
        refused = EventStream(keyed, path)
        assert refused.status == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert refused.headers["Access-Control-Allow-Origin"] == "*"
        with EventStream(keyed, path, auth()) as allowed:
            assert allowed.status == 200
    assert keyed.request("POST", "/events/token").status == 401
    issued = keyed.request("POST", "/events/token", b"", auth())
    assert issued.status == 200 and issued.headers["Cache-Control"] == "no-store"
    token = issued.json()["token"]
    assert 0 < issued.json()["expiresIn"] <= 60 and issued.json()["expiresAt"].endswith("Z")
    assert KEY not in token
    with EventStream(keyed, f"/events?token={token}") as stream:
        assert stream.status == 200
        assert stream.until(lambda e: e.event == "snapshot")
    with EventStream(keyed, f"{url}/events?token={token}") as stream:
        assert stream.status == 200
        assert stream.rest()[-1].event == "complete"
    # A token opens streams, nothing else; a forged or altered one opens nothing.
    assert keyed.get(f"/jobs?token={token}").status == 401
    assert keyed.get(f"{url}?token={token}").status == 401
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert EventStream(keyed, f"/events?token={forged}").status == 401
    assert EventStream(keyed, f"/events?token={KEY}").status == 401
    assert KEY not in keyed.log() and token not in keyed.log()


def test_cors_preflight_and_headers_on_streams(server: Server) -> None:
    preflight = server.request(
        "OPTIONS",
        "/events",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert preflight.status == 204
    assert "Last-Event-ID" in preflight.headers["Access-Control-Allow-Headers"]
    with EventStream(server, "/events", {"Origin": "https://app.example"}) as stream:
        assert stream.headers["Access-Control-Allow-Origin"] == "*"
        assert stream.headers["Cache-Control"] == "no-cache"


def test_bad_stream_requests(server: Server) -> None:
    unknown = EventStream(server, "/text-to-image/" + "0" * 32 + "/events")
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "not_found"
    odd = EventStream(server, "/events?since=3")
    assert odd.status == 400 and odd.json()["error"]["field"] == "since"
    assert server.request("HEAD", "/events").status == 405
    assert server.request("POST", "/events").status == 405
    assert server.get("/events/nothing").status == 404


# --- in process: the frame format, ids, tokens, the replay buffer ---------------------------


def test_frames_are_what_aiohttp_sse_writes() -> None:
    from aiohttp_sse import EventSourceResponse

    from sd_rest.api.streams import frame

    class Capture(EventSourceResponse):
        sent: list[bytes]

        async def write(self, data: bytes) -> None:  # type: ignore[override]
            self.sent.append(data)

    async def sent(**kwargs: Any) -> bytes:
        response = Capture()
        response.sent = []
        await response.send(**kwargs)
        return b"".join(response.sent)

    data = '{"id":"ab","prompt":"line\\nbreak ✓"}'
    assert frame(17, "progress", data) == asyncio.run(sent(data=data, id="17", event="progress"))
    assert frame(None, None, None, retry=2000) == b"retry: 2000\r\n\r\n"


def test_event_ids_are_read_strictly() -> None:
    from sd_rest.api.streams import parse_event_id

    assert parse_event_id(" 1796170011568715 ") == 1796170011568715
    for bad in (None, "", "-3", "1e5", "abc", "9" * 21):
        assert parse_event_id(bad) is None


def test_tokens_expire_and_cannot_be_forged() -> None:
    from sd_rest.api.tokens import make_token, token_key, token_valid

    key = token_key(KEY)
    assert key == token_key(KEY) and key != token_key(KEY + "x")  # survives a restart
    token, expires = make_token(key, 1000.0)
    assert expires == 1060
    assert token_valid(key, token, 1059.9)
    assert not token_valid(key, token, 1061)
    assert not token_valid(token_key("other"), token, 1000)
    payload, _, signature = token.rpartition(".")
    later = payload.replace("1060", "9999")
    assert not token_valid(key, f"{later}.{signature}", 1000)
    for bad in (None, "", "a.b", "...", token + "x"):
        assert not token_valid(key, bad, 1000)


def test_the_replay_buffer_gives_way_to_a_snapshot(tmp_path: Any) -> None:
    from sd_rest.api.streams import EventHub
    from sd_rest.jobs.manager import JobManager
    from sd_rest.state.jobs import Job

    from inprocess import settings, text_params

    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "output"))
        hub = EventHub(manager, 1 << 20, replay=4)
        job = Job("ab" * 16, "text-to-image", text_params(), "ckpt", {}, {}, seq=1)
        manager.store.keep(job)
        first = manager.events.emit(job, "moved", 9).id
        for position in range(8, 2, -1):
            manager.events.emit(job, "moved", position)
        # Four kept: a client that saw the one before them misses nothing.
        assert hub.covers(hub.last_id - 4) and not hub.covers(hub.last_id - 5)
        assert not hub.covers(first) and not hub.covers(hub.first_id - 1)
        inside = hub.open(job, hub.last_id - 2)
        assert inside is not None
        replayed = inside.take().split(b"\r\n\r\n")
        assert b"retry: 2000" in replayed[0]
        assert len(replayed) == 4  # retry, two events, and what follows the last separator
        assert b'"position":4' in replayed[1] and b'"position":3' in replayed[2]
        outside = hub.open(job, first)
        assert outside is not None
        snapshot = outside.take()
        assert b"event: snapshot" in snapshot and b'"status":"QUEUED"' in snapshot
        assert f"id: {hub.last_id}".encode() in snapshot
        await hub.close()
        assert inside.closed and outside.closed

    asyncio.run(scenario())


def test_snapshot_parts_are_the_item_bytes_and_are_shared() -> None:
    import json

    from sd_rest.api.stream_items import ItemParts, every_job_snapshot, job_snapshot
    from sd_rest.api.streams import frame
    from sd_rest.state.items import dumps, job_item
    from sd_rest.state.jobs import ImageRecord, Job, Status

    from inprocess import text_params

    queued = Job("ab" * 16, "text-to-image", text_params(prompt=BIG_PROMPT), "c", {}, {}, seq=1)
    running = Job("cd" * 16, "text-to-image", text_params(), "c", {}, {}, seq=2)
    running.status, running.progress, running.started_at = Status.IN_PROGRESS, (1, 0.5), 5.0
    running.images = (ImageRecord(1, 42, 1, "0" * 64),)
    failed = Job("ef" * 16, "text-to-image", text_params(), "c", {}, {}, seq=3)
    failed.status, failed.error, failed.finished_at = Status.FAILED, 'bad "quote"\n', 9.0
    items = ItemParts()
    for job, position in ((queued, 3), (queued, None), (running, None), (failed, None)):
        parts = items.parts(job, position)
        assert b"".join(parts) == dumps(job_item(job, position)).encode()
    whole = every_job_snapshot(7, [items.parts(queued, 2), items.parts(running, None)])
    expected = frame(7, "snapshot", dumps({"jobs": [job_item(queued, 2), job_item(running)]}))
    assert b"".join(whole) == expected
    assert b"".join(job_snapshot(8, "failed", items.parts(failed, None))) == frame(
        8, "failed", dumps(job_item(failed))
    )
    # A move changes the job's version, not its item: the long part stays the same object.
    before = items.parts(queued, 2)
    queued.version += 1
    after = items.parts(queued, 1)
    assert after[2] is before[2] and after[0] is before[0]
    assert json.loads(b"".join(after))["position"] == 1
    items.keep_only([(running.endpoint, running.id)])
    assert len(items) == 1


def test_an_opening_is_taken_a_chunk_at_a_time() -> None:
    from sd_rest.api.subscriber import CHUNK, Subscriber

    async def scenario() -> None:
        parts = [b"a" * 10, b"b" * (CHUNK * 2 + 5), b"c" * 3, b"d" * CHUNK]
        subscriber = Subscriber(None, 4096)
        subscriber.open_with(parts)
        subscriber.push(b"event")  # behind the opening, and counted
        assert subscriber.waiting == 5
        chunks = []
        while chunk := subscriber.take():
            chunks.append(chunk)
        assert b"".join(chunks) == b"".join(parts) + b"event"
        assert all(len(chunk) <= CHUNK for chunk in chunks)
        assert chunks[-1] == b"event" and subscriber.empty and subscriber.waiting == 0

    asyncio.run(scenario())
