"""The API node with --broker (issue 19, cluster.md): real API-node servers and a real
redis-server; a stand-in for a worker host (clusterfakes.py) takes the Dramatiq messages and
writes the job streams as the fence does. A POST enqueues the job; the stream's entries make
its status, images and events; entries of an old attempt and duplicate images are ignored; an
API node killed mid-job catches up after its restart; Redis down or emptied; cancel; the worker
hosts in `GET /`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sd_rest.cluster import entries, keys
from sd_rest.setup.demo import demo_checkpoint

from clusterfakes import Attempt, StandInWorker
from helpers import Server, end_all, png_bytes, wait_until
from redisserver import RedisServer
from sse import EventStream, job_events, names

TWO_IMAGES = {"prompt": "a lighthouse", "iterations": 1, "batchSize": 2, "seed": 7}


def demo_queue(model: str) -> str:
    path = demo_checkpoint(model)
    return keys.queue_for(path.name, hashlib.sha256(path.read_bytes()).hexdigest())


TEXT_QUEUE = demo_queue("text-to-image")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    end_all(started)


@pytest.fixture
def node(
    tmp_path: Path, certs: tuple[str, str, str], redis_url: str, servers: list[Server]
) -> Server:
    server = Server(tmp_path / "output", certs, args=["--broker", redis_url])
    servers.append(server.start())
    return server


@pytest.fixture
def worker(redis_url: str) -> Iterator[StandInWorker]:
    stand_in = StandInWorker(redis_url)
    yield stand_in
    stand_in.close()


def post(server: Server, doc: dict[str, Any] = TWO_IMAGES) -> str:
    response = server.post_json("text-to-image", doc)
    assert response.status == 303, response.body
    return response.json()["resultUrl"]


def job_key(url: str) -> tuple[str, str]:
    endpoint, id_ = url.strip("/").split("/")
    return endpoint, id_


def begin(worker: StandInWorker, url: str) -> Attempt:
    message = worker.take(TEXT_QUEUE)
    assert (message.endpoint, message.id) == job_key(url)
    run = worker.start(*job_key(url))
    assert isinstance(run, Attempt), run
    return run


def running(node: Server, worker: StandInWorker, fraction: float) -> tuple[str, Attempt]:
    """A job posted, started by the stand-in worker and IN_PROGRESS at `fraction` of image 1."""
    url = post(node)
    run = begin(worker, url)
    worker.progress(run, 1, fraction)
    node.wait_status(url, {"IN_PROGRESS"})
    return url, run


def hash_of(client: redis.Redis, url: str) -> dict[str, str]:
    raw = client.hgetall(keys.job(*job_key(url)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def kept_images(server: Server, url: str) -> int:
    return len(server.get(url).json()["images"])


# --- enqueue -------------------------------------------------------------------------------


def test_a_post_enqueues_the_job_with_its_inputs(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    init = png_bytes(256, 256, (10, 200, 30))
    response = node.post_form(
        "image-to-image", {"prompt": "a boat", "strength": "0.5"}, {"image": init}
    )
    assert response.status == 303, response.body
    url = response.json()["resultUrl"]
    client = redis_server.client()
    state = wait_until(
        lambda: hash_of(client, url).get("enqueued") == "1" and hash_of(client, url), "enqueued"
    )
    assert state["queue"] == TEXT_QUEUE
    assert (state["made"], state["canceled"], state["deliveries"]) == ("0",) * 3
    groups = client.xinfo_groups(keys.stream(*job_key(url)))
    assert [group["name"] for group in groups] == [keys.GROUP.encode()]
    message = worker.take(TEXT_QUEUE)
    assert (message.endpoint, message.id) == job_key(url)
    assert message.params["prompt"] == "a boat"
    assert message.checkpoint.name == "text-to-image.ckpt"
    assert (
        message.checkpoint.sha256
        == hashlib.sha256(demo_checkpoint("text-to-image").read_bytes()).hexdigest()
    )
    folder = node.output.joinpath(*job_key(url)) / "inputs"
    sidecar = json.loads((node.output.joinpath(*job_key(url)) / "job.json").read_bytes())
    assert message.inputs == {
        field: (folder / name).read_bytes() for field, name in sidecar["inputs"].items()
    }
    assert set(message.inputs) == {"image"}
    # The client's bytes' digests, which the worker host checks the inputs against.
    assert message.uploads == sidecar["uploads"] and set(message.uploads) == {"image"}
    # No live worker holds the checkpoint: the job says so while it waits.
    doc = node.get(url).json()
    assert doc["status"] == "QUEUED" and doc["position"] == 1
    assert doc["waiting"].startswith("no live worker holds the text-to-image checkpoint")
    info = node.get("/").json()
    assert (info["runner"], info["queued"], info["running"]) == ("remote", 1, 0)


# --- the stream ----------------------------------------------------------------------------


def test_the_stream_makes_the_status_images_and_events(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    with EventStream(node, "/events") as events:
        url = post(node)
        run = begin(worker, url)
        doc = wait_until(lambda: (d := node.get(url).json()).get("worker") and d, "the worker")
        assert doc["worker"] == {"host": worker.host, "pid": worker.pid}
        assert doc["status"] == "QUEUED" and doc["position"] == 0  # loading: no progress yet
        assert "waiting" not in doc
        assert worker.progress(run, 1, 0.5) == 1
        doc = node.wait_status(url, {"IN_PROGRESS"})
        assert doc["progress"]["currentImageIndex"] == 1
        assert doc["worker"] == {"host": worker.host, "pid": worker.pid}
        first, second = png_bytes(32, 32, (1, 2, 3)), png_bytes(32, 32, (4, 5, 6))
        assert worker.image(run, 1, first, seed=7, position=1) == 1
        wait_until(lambda: kept_images(node, url) == 1, "image 1")
        # Read again (never acknowledged, or a late copy): already kept, skipped.
        client.xadd(keys.stream(*job_key(url)), entries.image(run.attempt, 1, 99, 1, second))
        # An attempt that is not the current one: ignored, whatever it says.
        old = "0" * 32
        client.xadd(keys.stream(*job_key(url)), entries.image(old, 2, 99, 1, second))
        client.xadd(keys.stream(*job_key(url)), entries.end(old, "failed", "stale", b""))
        assert worker.progress(run, 2, 0.25) == 1
        wait_until(lambda: node.get(url).json()["progress"]["currentImageIndex"] == 2, "progress")
        assert kept_images(node, url) == 1
        assert worker.image(run, 2, second, seed=7, position=2) == 1
        assert worker.end(run, "complete") == 1
        doc = node.wait_status(url, {"COMPLETE", "FAILED"})
        got = events.until(lambda e: e.event == "complete")
    assert doc["status"] == "COMPLETE" and "worker" not in doc
    assert [(i["seed"], i["position"]) for i in doc["images"]] == [(7, 1), (7, 2)]
    assert node.get(f"{url}/1.png").body == first
    assert node.get(f"{url}/2.png").body == second
    mine = names(job_events(got, job_key(url)[1]))
    assert mine[0] == "queued" and mine[-1] == "complete"
    assert mine.count("image") == 2 and "started" in mine and "progress" in mine
    # Finished: nothing of it is left in Redis.
    wait_until(
        lambda: not client.exists(keys.job(*job_key(url)), keys.stream(*job_key(url))), "gone"
    )
    sidecar = json.loads((node.output.joinpath(*job_key(url)) / "job.json").read_bytes())
    assert sidecar["pid"] is None and "worker" not in sidecar
    assert "stand-in log tail" in (node.output.joinpath(*job_key(url)) / "job.log").read_text()


def test_a_new_attempt_restarts_the_job_and_keeps_its_images(
    node: Server, worker: StandInWorker, redis_url: str
) -> None:
    url = post(node)
    run = begin(worker, url)
    worker.progress(run, 1, 0.5)
    worker.image(run, 1, png_bytes(16, 16), seed=7, position=1)
    wait_until(lambda: kept_images(node, url) == 1, "image 1")
    # The job is delivered again (its worker host died): a second host starts it.
    other = StandInWorker(redis_url, host="second-host", pid=777)
    try:
        again = other.start(*job_key(url))
        assert isinstance(again, Attempt) and again.made == 1
        assert worker.image(run, 2, png_bytes(16, 16, (9, 9, 9)), 7, 2) == 0  # fenced off
        doc = wait_until(
            lambda: (
                (d := node.get(url).json()).get("worker", {}).get("host") == "second-host" and d
            ),
            "2nd",
        )
        assert doc["worker"] == {"host": "second-host", "pid": 777}
        other.progress(again, 2, 0.5)
        assert other.image(again, 2, png_bytes(16, 16, (5, 5, 5)), seed=8, position=1) == 1
        other.end(again, "complete")
    finally:
        other.close()
    doc = node.wait_status(url, {"COMPLETE", "FAILED"})
    assert [(i["seed"], i["position"]) for i in doc["images"]] == [(7, 1), (8, 1)]
    sidecar = json.loads((node.output.joinpath(*job_key(url)) / "job.json").read_bytes())
    assert sidecar["attempts"] == 2


def test_stopped_requeues_and_the_redelivery_ends_it(node: Server, worker: StandInWorker) -> None:
    url, run = running(node, worker, 0.5)
    assert worker.end(run, "stopped") == 1  # its host is shutting down
    doc = wait_until(lambda: (d := node.get(url).json()).get("position") == 1 and d, "queued again")
    assert doc["status"] == "QUEUED" and "worker" not in doc
    again = worker.start(*job_key(url))
    assert isinstance(again, Attempt)
    worker.end(again, "failed", "CUDA out of memory")
    doc = node.wait_status(url, {"FAILED"})
    assert doc["error"] == "CUDA out of memory"


def test_the_end_the_fence_adds_for_a_job_whose_workers_died_fails_it(
    node: Server, worker: StandInWorker
) -> None:
    url = post(node)
    begin(worker, url)
    for _ in range(2):  # delivered again after each host death
        assert isinstance(worker.start(*job_key(url)), Attempt)
    # A fourth delivery: the fence ends it under an attempt that never started.
    assert worker.start(*job_key(url)) == "dead"
    doc = node.wait_status(url, {"FAILED", "COMPLETE"})
    assert doc["error"].startswith(f"its worker died 3 times: {worker.host} (pid {worker.pid})")


# --- restarts ------------------------------------------------------------------------------


def test_a_node_killed_mid_job_catches_up_without_enqueueing_again(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    url = post(node)
    run = begin(worker, url)
    worker.progress(run, 1, 0.5)
    worker.image(run, 1, png_bytes(16, 16), seed=7, position=1)
    wait_until(lambda: kept_images(node, url) == 1, "image 1")
    node.kill()  # SIGKILL
    # Made while the API node is down: kept in the stream for it.
    second = png_bytes(16, 16, (200, 0, 0))
    assert worker.image(run, 2, second, seed=7, position=2) == 1
    assert worker.end(run, "complete") == 1
    node.start()
    doc = node.wait_status(url, {"COMPLETE", "FAILED"})
    assert doc["status"] == "COMPLETE", doc
    assert [(i["seed"], i["position"]) for i in doc["images"]] == [(7, 1), (7, 2)]
    assert node.get(f"{url}/2.png").body == second
    # Followed, not enqueued again: no second message, one delivery.
    assert client.llen(f"{keys.DRAMATIQ_NAMESPACE}:{TEXT_QUEUE}") == 0
    assert not client.exists(keys.job(*job_key(url)))


def test_a_node_restarted_while_its_job_runs_follows_the_same_attempt(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    url, run = running(node, worker, 0.5)
    assert node.stop(signal.SIGTERM) == 0  # stopping leaves Redis alone
    assert hash_of(redis_server.client(), url)["attempt"] == run.attempt
    node.start()
    doc = wait_until(lambda: (d := node.get(url).json()).get("worker") and d, "the worker again")
    assert doc["worker"]["host"] == worker.host
    worker.progress(run, 1, 0.9)
    worker.image(run, 1, png_bytes(16, 16), seed=7, position=1)
    worker.image(run, 2, png_bytes(16, 16), seed=7, position=2)
    worker.end(run, "complete")
    assert node.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    assert redis_server.client().llen(f"{keys.DRAMATIQ_NAMESPACE}:{TEXT_QUEUE}") == 0


# --- Redis down ----------------------------------------------------------------------------


def test_redis_down_refuses_posts_serves_the_rest_and_an_emptied_redis_gets_the_job_again(
    tmp_path: Path, certs: tuple[str, str, str], servers: list[Server]
) -> None:
    own = RedisServer(tmp_path / "redis").start()
    try:
        node = Server(tmp_path / "output", certs, args=["--broker", own.url])
        servers.append(node.start())
        worker = StandInWorker(own.url)
        done_url = post(node)
        run = begin(worker, done_url)
        worker.image(run, 1, png_bytes(16, 16), 7, 1)
        worker.image(run, 2, png_bytes(16, 16), 7, 2)
        worker.end(run, "complete")
        node.wait_status(done_url, {"COMPLETE"})
        waiting_url = post(node, {**TWO_IMAGES, "prompt": "waits"})
        wait_until(lambda: hash_of(own.client(), waiting_url).get("enqueued") == "1", "enqueued")
        worker.close()
        own.stop()
        folders = sorted((node.output / "text-to-image").iterdir())
        response = node.post_json("text-to-image", {**TWO_IMAGES, "prompt": "refused"})
        assert response.status == 503
        error = response.json()["error"]
        assert error["code"] == "broker_unavailable" and "Redis" in error["message"]
        assert sorted((node.output / "text-to-image").iterdir()) == folders
        assert node.get("/").status == 200
        assert {i["resultUrl"] for i in node.get("/jobs").json()["items"]} == {
            done_url,
            waiting_url,
        }
        assert node.get(f"{done_url}/1.png").status == 200
        assert node.get(waiting_url).json()["status"] == "QUEUED"
        own.start()  # empty: it lost the waiting job
        state = wait_until(
            lambda: hash_of(own.client(), waiting_url).get("enqueued") == "1", "again", 30
        )
        assert state
        worker = StandInWorker(own.url)
        message = worker.take(TEXT_QUEUE)
        assert message.id == job_key(waiting_url)[1]
        worker.close()
        assert node.post_json("text-to-image", {**TWO_IMAGES, "prompt": "back"}).status == 303
    finally:
        own.stop()


# --- cancel --------------------------------------------------------------------------------


def test_delete_of_a_running_remote_job_cancels_it_and_tells_the_worker(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    url, run = running(node, worker, 0.3)
    pubsub = redis_server.client().pubsub()
    pubsub.subscribe(keys.CANCEL_CHANNEL)
    seen: list[Any] = []
    monitor = threading.Thread(target=_monitor, args=(redis_server, seen), daemon=True)
    monitor.start()
    time.sleep(0.2)  # the monitor is connected
    response = node.request("DELETE", url)
    # The DELETE waits at most 2 s for the run's end: CANCELED in its answer is within them.
    assert response.status == 200 and response.json()["status"] == "CANCELED"
    message = wait_until(
        lambda: pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1), "the news"
    )
    assert message["data"] == f"{job_key(url)[0]}:{job_key(url)[1]}".encode()
    wait_until(
        lambda: any(b"canceled" in line and b"HSET" in line.upper() for line in seen), "HSET"
    )
    assert worker.progress(run, 1, 0.5) in (0, -1)  # the worker is told to stop


def _monitor(redis_server: RedisServer, seen: list[Any]) -> None:
    """Every command Redis runs, until the cancel's HSET (MONITOR)."""
    with contextlib.suppress(redis.RedisError), redis_server.client().monitor() as watch:
        for command in watch.listen():
            seen.append(command["command"].encode())
            if b"canceled" in seen[-1] and seen[-1].upper().startswith(b"HSET"):
                return


def test_a_canceled_queued_remote_job_never_starts(node: Server, worker: StandInWorker) -> None:
    url = post(node)
    assert node.request("DELETE", url).json()["status"] == "CANCELED"
    # Its message is taken back, even from a send the DELETE met halfway; a worker that
    # took it first drops it at START.
    assert worker.start(*job_key(url)) in ("gone", "canceled")
    name = f"{keys.DRAMATIQ_NAMESPACE}:{TEXT_QUEUE}"
    client = redis.Redis.from_url(worker.url)
    wait_until(lambda: client.llen(name) == 0 and client.hlen(f"{name}.msgs") == 0, "taken back")


# --- the worker hosts in GET / -------------------------------------------------------------


def test_get_index_lists_the_live_worker_hosts_and_the_endpoints_none_serves(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    text = demo_checkpoint("text-to-image")
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    worker.register(
        [{"model": "text-to-image", "name": text.name, "sha256": digest,
          "queues": [TEXT_QUEUE, keys.queue_for(text.name, None)]}],
        state="busy", jobs=[{"endpoint": "text-to-image", "id": "a" * 32}], served=3,
    )  # fmt: skip
    client = redis_server.client()
    client.sadd(keys.WORKERS, "expired-one")  # its record is gone: a dead host
    info = wait_until(lambda: (d := node.get("/").json())["workers"] and d, "the worker")
    [listed] = info["workers"]
    assert listed["host"] == worker.host and listed["pid"] == worker.pid
    assert listed["state"] == "busy" and listed["served"] == 3
    assert listed["jobs"] == [{"endpoint": "text-to-image", "id": "a" * 32}]
    assert listed["models"] == [{"model": "text-to-image", "name": text.name, "sha256": digest}]
    assert isinstance(listed["last_heartbeat"], float)
    assert set(info["unserved"]) == {"/inpaint-image"}
    assert "no live worker holds the inpaint-image checkpoint" in info["unserved"]["/inpaint-image"]
    wait_until(lambda: not client.sismember(keys.WORKERS, "expired-one"), "pruned")
    url = post(node)
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "enqueued")
    assert "waiting" not in node.get(url).json()  # a live worker can take it


# --- the command line ----------------------------------------------------------------------


def _start_line(
    args: list[str], tmp_path: Path, prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import sys; from sd_rest.cli import main; sys.argv[0] = 'x'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "--demo", "--output", str(tmp_path / "out"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_bad_broker_url_is_one_line(tmp_path: Path) -> None:
    done = _start_line(["--broker", "http://example.com"], tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis:// or rediss://" in lines[0], done.stderr


def test_a_missing_cluster_extra_is_one_line(tmp_path: Path) -> None:
    blocked = "import sys; sys.modules['dramatiq'] = None; "
    done = _start_line(["--broker", "redis://127.0.0.1:1/0"], tmp_path, blocked)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cluster extra" in lines[0] and "Traceback" not in done.stderr


def test_a_server_without_broker_starts_without_the_extra(
    tmp_path: Path, certs: tuple[str, str, str], servers: list[Server]
) -> None:
    server = Server(tmp_path / "output", certs)
    blocked = "import sys; sys.modules['dramatiq'] = None; sys.modules['redis'] = None; "
    run = "import runpy; runpy.run_module('sd_rest', run_name='__main__')"
    command = server.command
    server.command = lambda: [sys.executable, "-c", blocked + run, *command()[3:]]  # type: ignore[method-assign]
    servers.append(server.start())
    assert server.get("/").json()["runner"] == "resident"


def test_an_unreachable_redis_at_start_is_a_warning_and_posts_get_503(
    tmp_path: Path, certs: tuple[str, str, str], servers: list[Server]
) -> None:
    from helpers import free_port

    url = f"redis://:nope@127.0.0.1:{free_port()}/0"
    server = Server(tmp_path / "output", certs, args=["--broker", url])
    servers.append(server.start())
    assert "cannot reach Redis" in server.log() and ":***@" in server.log()
    assert "nope" not in server.log()
    response = server.post_json("text-to-image", TWO_IMAGES)
    assert response.status == 503 and response.json()["error"]["code"] == "broker_unavailable"


# --- review findings: the reader, the end, the node's broker -------------------------------


def test_the_reader_goes_on_with_many_jobs_followed_and_one_canceled(
    node: Server, worker: StandInWorker
) -> None:
    urls = [post(node, {**TWO_IMAGES, "prompt": f"job {n}"}) for n in range(150)]
    assert node.request("DELETE", urls[0]).json()["status"] == "CANCELED"
    run = begin_any(worker, urls[1])
    assert worker.progress(run, 1, 0.5) == 1
    assert node.wait_status(urls[1], {"IN_PROGRESS"})["progress"]["currentImageIndex"] == 1


def begin_any(worker: StandInWorker, url: str) -> Attempt:
    """Job `url` started by `worker`, whichever message it takes first."""
    run = worker.start(*job_key(url))
    assert isinstance(run, Attempt), run
    return run


def test_the_end_stays_in_redis_until_the_outcome_is_durable_and_a_failing_delete_waits(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    url = post(node)
    run = begin(worker, url)
    client.execute_command("ACL", "SETUSER", "default", "-del")  # the keys' deletion fails
    try:
        worker.image(run, 1, png_bytes(16, 16), 7, 1)
        worker.image(run, 2, png_bytes(16, 16), 7, 2)
        worker.end(run, "complete")
        assert node.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
        # The end was never acknowledged: a node dying now would read it again.
        last = client.xrange(keys.stream(*job_key(url)))[-1][1]
        assert last[b"kind"] == b"end"
        assert client.xpending(keys.stream(*job_key(url)), keys.GROUP)["pending"] == 1
    finally:
        client.execute_command("ACL", "SETUSER", "default", "+del")
    wait_until(lambda: not client.exists(keys.job(*job_key(url))), "deleted once Redis lets it")
    assert node.get(url).json()["status"] == "COMPLETE"


def test_a_canceled_queued_job_settles_at_once_and_its_message_is_taken_back(
    node: Server, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    url = post(node)
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "enqueued")
    name = f"{keys.DRAMATIQ_NAMESPACE}:{TEXT_QUEUE}"
    assert client.llen(name) == 1 and client.hlen(f"{name}.msgs") == 1
    assert node.request("DELETE", url).json()["status"] == "CANCELED"
    wait_until(lambda: client.llen(name) == 0 and client.hlen(f"{name}.msgs") == 0, "taken back")


def test_the_node_enqueues_without_dramatiqs_cleanup(redis_url: str) -> None:
    """A node's --heartbeat-timeout shorter than the hosts' never re-delivers a live job."""
    import dramatiq

    from sd_rest.cluster.connection import NodeRedis
    from sd_rest.cluster.message import Checkpoint, JobMessage

    client = redis.Redis.from_url(redis_url)
    namespace, queue = keys.DRAMATIQ_NAMESPACE, "sha-live"
    # A worker host whose last Dramatiq heartbeat is 5 s old, holding a message.
    client.zadd(f"{namespace}:__heartbeats__", {"host-b": int(time.time() * 1000) - 5000})
    client.sadd(f"{namespace}:__acks__.host-b.{queue}", "held-message")
    message = JobMessage("text-to-image", "f" * 32, {}, Checkpoint("m.ckpt", None), {})

    async def send() -> None:
        node = NodeRedis(redis_url, heartbeat_timeout=1.0)
        try:
            await node.send(queue, message)
        finally:
            await node.close()

    asyncio.run(send())
    assert client.smembers(f"{namespace}:__acks__.host-b.{queue}") == {b"held-message"}
    assert dramatiq  # the extra is there


def test_a_send_cancelled_midway_still_marks_the_job_enqueued(redis_url: str) -> None:
    from sd_rest.cluster.connection import NodeRedis
    from sd_rest.cluster.message import Checkpoint, JobMessage

    client = redis.Redis.from_url(redis_url)
    message = JobMessage("text-to-image", "e" * 32, {}, Checkpoint("m.ckpt", None), {})

    async def scenario() -> None:
        node = NodeRedis(redis_url, heartbeat_timeout=30.0)
        try:
            await node.create("text-to-image", message.id, "sha-cut", 0, 1)
            sending = asyncio.create_task(node.send("sha-cut", message))
            await asyncio.sleep(0)  # the message is on its way (a thread)
            await asyncio.sleep(0)
            sending.cancel()  # the node stops meanwhile
            await asyncio.gather(sending, return_exceptions=True)
            for _ in range(100):
                if client.hget(keys.job("text-to-image", message.id), "enqueued") == b"1":
                    return
                await asyncio.sleep(0.05)
        finally:
            await node.close()

    asyncio.run(scenario())
    assert client.llen(f"{keys.DRAMATIQ_NAMESPACE}:sha-cut") == 1
    assert client.hget(keys.job("text-to-image", message.id), "enqueued") == b"1"


def test_a_hash_left_unsent_after_an_outage_is_sent(
    node: Server, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    url = post(node)
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "enqueued")
    name = f"{keys.DRAMATIQ_NAMESPACE}:{TEXT_QUEUE}"
    # As if Redis went away between the hash and the message.
    client.delete(name, f"{name}.msgs")
    client.hset(keys.job(*job_key(url)), "enqueued", "0")
    client.client_kill_filter(_type="normal", skipme=True)
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "sent again", 20)
    assert client.llen(name) == 1


def test_a_job_whose_worker_host_is_gone_waits_in_the_queue_again(
    tmp_path: Path, certs: tuple[str, str, str], redis_url: str, servers: list[Server],
    worker: StandInWorker,
) -> None:  # fmt: skip
    node = Server(tmp_path / "output", certs, args=["--broker", redis_url,
                                                    "--heartbeat-timeout", "1"])  # fmt: skip
    servers.append(node.start())
    worker.register([], ttl=1.0)  # its heartbeat stops: gone after a second
    url, run = running(node, worker, 0.5)
    doc = node.wait_status(url, {"QUEUED"}, timeout=20)
    assert doc["waiting"].startswith("no live worker holds the text-to-image checkpoint")
    # It was alive after all: its next entry runs the job again.
    worker.progress(run, 1, 0.7)
    node.wait_status(url, {"IN_PROGRESS"})


class _Recorder:
    """The follower's target (its seam): records entries; the first one fails."""

    def __init__(self) -> None:
        self.seen: list[entries.Entry] = []

    async def entry(self, entry: entries.Entry) -> None:
        self.seen.append(entry)
        if len(self.seen) == 1:
            raise ValueError("a bug in one entry's handling")

    async def redis_back(self) -> None:
        return None


def test_the_follower_reads_a_stream_once_started_and_survives_a_failing_entry(
    redis_url: str,
) -> None:
    from sd_rest.cluster.fence import Fence
    from sd_rest.cluster.follower import Follower

    client = redis.Redis.from_url(redis_url)
    endpoint, id_ = "text-to-image", "d" * 32
    stream = keys.stream(endpoint, id_)
    client.hset(keys.job(endpoint, id_), mapping={"queue": "q", "made": 0, "enqueued": 1,
                                                  "canceled": 0, "deliveries": 0})  # fmt: skip
    client.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    target = _Recorder()

    async def scenario() -> None:
        follower = Follower(redis_url)
        follower.start()
        try:
            follower.follow(stream, keys.job(endpoint, id_), target, active=False)
            client.xadd(stream, entries.progress("x", 1, 0.1))  # not started: not read
            await asyncio.sleep(0.5)
            assert target.seen == []
            ref = entries.WorkerRef("h", 1, "w")
            assert Fence(client).start(endpoint, id_, "t1", ref).verdict == "run"
            for _ in range(200):
                if len(target.seen) >= 2 and not client.xpending(stream, keys.GROUP)["pending"]:
                    break
                await asyncio.sleep(0.05)
        finally:
            await follower.close()

    asyncio.run(scenario())
    assert [type(e) for e in target.seen] == [entries.Progress, entries.Started]
    # The failing entry was logged and acknowledged, not left pending for good.
    assert client.xpending(stream, keys.GROUP)["pending"] == 0


# --- keys left behind (review of issue 19: findings 1, 3, 5, 6, 8, 10) ---------------------


def test_a_retried_job_whose_earlier_keys_were_left_in_redis_runs_anew(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    url = post(node)
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "enqueued")
    client.execute_command("ACL", "SETUSER", "default", "-del")  # its keys stay
    try:
        assert node.request("DELETE", url).json()["status"] == "CANCELED"
        node.kill()  # what it meant to delete later is lost with it
        node.start()
    finally:
        client.execute_command("ACL", "SETUSER", "default", "+del")
    assert hash_of(client, url).get("canceled") == "1"  # the earlier run's, still there
    assert post(node) == url  # posted again: a retry, a new run
    run = begin(worker, url)
    worker.image(run, 1, png_bytes(16, 16), 7, 1)
    worker.image(run, 2, png_bytes(16, 16), 7, 2)
    worker.end(run, "complete")
    assert node.wait_status(url, {"COMPLETE", "FAILED", "CANCELED"})["status"] == "COMPLETE"


def test_a_send_that_finds_the_job_canceled_or_gone_takes_its_message_back(
    redis_url: str,
) -> None:
    from sd_rest.cluster.connection import NodeRedis
    from sd_rest.cluster.message import Checkpoint, JobMessage

    client = redis.Redis.from_url(redis_url)
    canceled = JobMessage("text-to-image", "c" * 32, {}, Checkpoint("m.ckpt", None), {})
    gone = JobMessage("text-to-image", "d" * 32, {}, Checkpoint("m.ckpt", None), {})

    async def scenario() -> None:
        node = NodeRedis(redis_url, heartbeat_timeout=30.0)
        try:
            # A DELETE while Dramatiq took the message: canceled, or settled and deleted.
            await node.create("text-to-image", canceled.id, "sha-race", 0, 1)
            client.hset(keys.job("text-to-image", canceled.id), "canceled", 1)
            await node.send("sha-race", canceled)
            await node.send("sha-race", gone)
        finally:
            await node.close()

    asyncio.run(scenario())
    name = f"{keys.DRAMATIQ_NAMESPACE}:sha-race"
    assert client.llen(name) == 0 and client.hlen(f"{name}.msgs") == 0
    assert client.hget(keys.job("text-to-image", canceled.id), "enqueued") == b"0"
    assert not client.exists(keys.job("text-to-image", gone.id))  # not brought back


def test_delete_incomplete_drops_the_keys_and_messages_of_the_jobs_it_deletes(
    node: Server, redis_server: RedisServer, tmp_path: Path, certs: tuple[str, str, str],
    servers: list[Server], redis_url: str,
) -> None:  # fmt: skip
    client = redis_server.client()
    url = post(node)
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "enqueued")
    assert node.stop(signal.SIGTERM) == 0
    again = Server(node.output, certs, args=["--broker", redis_url, "--delete-incomplete"])
    servers.append(again.start())
    name = f"{keys.DRAMATIQ_NAMESPACE}:{TEXT_QUEUE}"
    wait_until(lambda: not client.exists(keys.job(*job_key(url))), "its hash dropped")
    assert client.llen(name) == 0 and client.hlen(f"{name}.msgs") == 0
    assert not client.exists(keys.stream(*job_key(url)))


def test_a_job_a_restart_completes_from_its_images_on_disk_drops_its_keys(
    node: Server, worker: StandInWorker, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    url = post(node)
    run = begin(worker, url)
    worker.image(run, 1, png_bytes(16, 16), 7, 1)
    worker.image(run, 2, png_bytes(16, 16), 7, 2)
    wait_until(lambda: kept_images(node, url) == 2, "both images")
    node.kill()  # before the end: the restart completes it from its images
    node.start()
    assert node.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    wait_until(lambda: not client.exists(keys.job(*job_key(url))), "its hash dropped")
    assert worker.end(run, "complete") == 0  # the worker's late end goes nowhere


def _quick_node(tmp_path: Path, certs: tuple[str, str, str], url: str) -> Server:
    return Server(tmp_path / "output", certs, args=["--broker", url, "--heartbeat-timeout", "1"])


def test_a_job_its_live_host_no_longer_lists_is_sent_again(
    tmp_path: Path, certs: tuple[str, str, str], redis_url: str, servers: list[Server],
    worker: StandInWorker,
) -> None:  # fmt: skip
    node = _quick_node(tmp_path, certs, redis_url)
    servers.append(node.start())
    worker.register([], ttl=60.0)  # alive throughout, and running nothing
    url = post(node)
    run = begin(worker, url)
    worker.image(run, 1, png_bytes(16, 16), 7, 1)
    wait_until(lambda: kept_images(node, url) == 1, "image 1")
    node.wait_status(url, {"QUEUED"}, timeout=20)
    again = begin(worker, url)  # its message was sent again
    assert again.made == 1
    assert worker.image(run, 2, png_bytes(16, 16), 7, 2) == 0  # the old attempt is over
    worker.image(again, 2, png_bytes(16, 16), 7, 2)
    worker.end(again, "complete")
    doc = node.wait_status(url, {"COMPLETE", "FAILED"})
    assert doc["status"] == "COMPLETE" and len(doc["images"]) == 2


def test_a_host_sharing_host_and_pid_with_a_dead_one_does_not_keep_its_job(
    tmp_path: Path, certs: tuple[str, str, str], redis_url: str, servers: list[Server],
    worker: StandInWorker,
) -> None:  # fmt: skip
    node = _quick_node(tmp_path, certs, redis_url)
    servers.append(node.start())
    worker.register([], ttl=1.0)  # its heartbeat stops: gone after a second
    url, _ = running(node, worker, 0.5)
    # Another container: the same host name and pid 1 as the dead one, another worker id,
    # and (as far as host and pid tell) running this job.
    twin = StandInWorker(redis_url, host=worker.host, pid=worker.pid)
    try:
        endpoint, id_ = job_key(url)
        twin.register([], ttl=60.0, jobs=[{"endpoint": endpoint, "id": id_}])
        doc = node.wait_status(url, {"QUEUED"}, timeout=20)
        assert doc["waiting"].startswith("no live worker holds")
    finally:
        twin.close()


def test_a_redis_refusal_while_checking_jobs_after_an_outage_is_tried_again(
    node: Server, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    url = post(node)
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "enqueued")
    name = f"{keys.DRAMATIQ_NAMESPACE}:{TEXT_QUEUE}"
    client.delete(name, f"{name}.msgs")  # as if the send never reached Redis
    client.hset(keys.job(*job_key(url)), "enqueued", "0")
    client.execute_command("ACL", "SETUSER", "default", "-hgetall")  # the job's hash refused
    try:
        since = len(node.log())
        client.client_kill_filter(_type="normal", skipme=True)
        wait_until(lambda: "Redis answers" in node.log()[since:], "the check after the outage")
        time.sleep(1.0)  # the check meets the refusal
    finally:
        client.execute_command("ACL", "SETUSER", "default", "+hgetall")
    wait_until(lambda: hash_of(client, url).get("enqueued") == "1", "sent once Redis lets it", 20)
    assert client.llen(name) == 1
