"""Worker hosts (`stable-diffusion-rest-api worker`) as real processes on a real redis-server,
driven without an API node: each job's hash and consumer group made as cluster.md says, a
real Dramatiq message enqueued, the job's stream read back and decoded. What a host adds,
what the fence keeps it from adding, cancels, dead workers counted, and the graceful stop."""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sd_rest.cluster import entries, keys
from sd_rest.cluster.message import JobMessage
from sd_rest.endpoints import ENDPOINTS
from sd_rest.images.pngfile import is_complete_png, png_size

from clusterjobs import (
    TEXT_TO_IMAGE,
    RefusingWrites,
    WorkerHost,
    create_job,
    demo_checkpoint,
    enqueue,
    job_message,
    queue_length,
    stream_entries,
    submit,
    wait_end,
    wait_entry,
)
from helpers import mask_bytes, png_bytes, script_pids, wait_gone, wait_until
from redisserver import RedisServer
from redisserver import skip_reason as redis_skip_reason

SLOW = {"SD_SIM_STEP_SECONDS": "0.05"}  # 8 steps: 0.4 s an image, time to act mid-run


@pytest.fixture(scope="module")
def host(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One worker host for the module's jobs: one process per script run (a cancel ends
    its process), heartbeats 2 s apart at most."""
    folder = tmp_path_factory.mktemp("host")
    argv_log = folder / "argv.jsonl"
    worker = WorkerHost(
        redis_server.url,
        folder / "worker",
        ["--runner", "process", "--heartbeat-timeout", "2"],
        {**SLOW, "SD_SIM_ARGV_LOG": str(argv_log)},
    )
    worker.start()
    worker.argv_log = argv_log  # type: ignore[attr-defined]
    yield worker
    worker.end()


@pytest.fixture
def client(redis_url: str, host: WorkerHost) -> Any:
    """The emptied Redis, once the module's host is listed in it again."""
    import redis

    found = redis.Redis.from_url(redis_url)
    wait_until(lambda: host.record(found), "the host's record")
    return found


def ran(host: WorkerHost, message: JobMessage) -> list[int]:
    return script_pids(host.argv_log, f"/{message.endpoint}/{message.id}")  # type: ignore[attr-defined]


def served(client: Any, host: WorkerHost) -> int:
    record = host.record(client)
    assert record is not None
    return int(record["served"])


def acknowledged(client: Any, message: JobMessage) -> bool:
    """Dramatiq has taken the message off its queue and acknowledged it."""
    queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
    pending = client.hlen(f"{keys.DRAMATIQ_NAMESPACE}:{queue}.msgs")
    return queue_length(client, queue) == 0 and pending == 0


def check_complete(found: list[entries.Entry], total: int, seed: int, size: tuple[int, int]):
    """started first, progress moving forward, every image once in order with its seed and
    position and PNG bytes, end complete last: all of one attempt."""
    started, end = found[0], found[-1]
    assert isinstance(started, entries.Started) and started.delivery == 1
    assert end == entries.End(started.attempt, "complete", None, end.log_tail)
    assert "=== sd-rest run 1 at" in end.log_tail  # the scratch job.log, its tail
    assert {entry.attempt for entry in found} == {started.attempt}
    images = [e for e in found if isinstance(e, entries.Image)]
    assert [(i.n, i.seed, i.position) for i in images] == [
        (n, seed, n) for n in range(1, total + 1)
    ]
    for image in images:
        assert is_complete_png(image.png) and png_size(image.png) == size
        assert _label(image.png)["image"] == {"number": image.n, "seed": seed, "position": image.n}
    progress = [(p.index, p.fraction) for p in found if isinstance(p, entries.Progress)]
    assert progress and progress == sorted(progress)
    return images


def _label(png: bytes) -> dict[str, Any]:
    """The sd-rest metadata a run adds to each image."""
    with Image.open(io.BytesIO(png)) as image:
        return json.loads(image.text["sd-rest"])  # type: ignore[attr-defined]


def test_a_job_runs_and_reports_every_step(client: Any, host: WorkerHost, redis_url: str) -> None:
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 2, "batchSize": 2})
    submit(client, redis_url, message)
    found = wait_end(client, message)
    check_complete(found, 4, 42, (256, 256))
    started = found[0]
    assert isinstance(started, entries.Started)
    record = host.record(client)
    assert record is not None and host.process is not None
    assert (started.worker.host, started.worker.pid) == (record["host"], host.process.pid)
    assert client.hget(keys.job(message.endpoint, message.id), "made") == b"4"
    assert len(ran(host, message)) == 1


def test_the_registry_record_lists_the_models_and_their_queues(
    client: Any, host: WorkerHost
) -> None:
    record = host.record(client)
    assert record is not None
    assert record["state"] == "idle" and record["jobs"] == []
    assert record["runner"] == "process" and record["concurrency"] == 1
    models = {m["model"]: m for m in record["models"]}
    for model in ("text-to-image", "inpaint-image"):
        checkpoint = demo_checkpoint(model)
        assert models[model]["sha256"] == checkpoint.sha256
        assert models[model]["queues"] == [
            keys.queue_for(checkpoint.name, checkpoint.sha256),
            keys.queue_for(checkpoint.name, None),
        ]
    assert client.pttl(keys.worker(record["id"])) <= 2000


def test_a_resumed_delivery_makes_only_the_missing_images(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 3, "seed": 7})
    submit(client, redis_url, message, made=1)
    found = wait_end(client, message)
    images = [e for e in found if isinstance(e, entries.Image)]
    # The resume rule: the run seeded seed + done, its images numbered on from done.
    assert [(i.n, i.seed, i.position) for i in images] == [(2, 8, 1), (3, 8, 2)]
    assert isinstance(found[-1], entries.End) and found[-1].outcome == "complete"


@pytest.mark.parametrize("endpoint", ["image-to-image", "inpaint-image"])
def test_jobs_with_input_files_run(
    client: Any, host: WorkerHost, redis_url: str, endpoint: str
) -> None:
    uploads = {"image": png_bytes(256, 256)}
    if endpoint == "inpaint-image":
        uploads["mask"] = mask_bytes(256, 256)
    inputs = ENDPOINTS[endpoint].prepare_inputs(uploads)
    fields = {"prompt": "a boat", "steps": 8} if endpoint == "image-to-image" else {"steps": 8}
    message = job_message(endpoint, fields, inputs)
    submit(client, redis_url, message)
    found = wait_end(client, message)
    check_complete(found, 1, 42, (256, 256))
    argv = next(run["argv"] for run in _runs(host) if message.id in " ".join(run["argv"]))
    assert argv[0].endswith(ENDPOINTS[endpoint].script)


def ends(found: list[entries.Entry], count: int) -> list[entries.Entry] | None:
    """`found` once it holds `count` ends."""
    return found if sum(isinstance(e, entries.End) for e in found) >= count else None


def _runs(host: WorkerHost) -> list[dict[str, Any]]:
    from helpers import read_jsonl

    return read_jsonl(host.argv_log)  # type: ignore[attr-defined]


def test_a_message_that_cannot_be_read_ends_failed(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    message = job_message("text-to-image", TEXT_TO_IMAGE)
    create_job(client, message.endpoint, message.id)
    damaged = {**message.to_json(), "inputs": "nope"}
    enqueue(redis_url, message, damaged)
    found = wait_end(client, message)
    assert isinstance(found[0], entries.Started)
    end = found[-1]
    assert isinstance(end, entries.End) and end.outcome == "failed"
    assert end.error == "the job's message could not be read: inputs is not an object"
    assert ran(host, message) == []


def test_a_bad_parameter_is_refused_by_the_worker(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    good = job_message("text-to-image", TEXT_TO_IMAGE)
    message = JobMessage(
        good.endpoint, good.id, {**good.params, "steps": 100000}, good.checkpoint, {}
    )
    submit(client, redis_url, message)
    end = wait_end(client, message)[-1]
    assert isinstance(end, entries.End) and end.outcome == "failed"
    assert end.error is not None and end.error.startswith("the worker refused a parameter: steps")
    assert ran(host, message) == []


def test_a_job_canceled_before_its_start_never_runs(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    message = job_message("text-to-image", TEXT_TO_IMAGE)
    create_job(client, message.endpoint, message.id, canceled="1")
    enqueue(redis_url, message)
    wait_until(lambda: acknowledged(client, message), "the message to be taken")
    assert stream_entries(client, message.endpoint, message.id) == []
    assert client.hget(keys.job(message.endpoint, message.id), "deliveries") == b"0"
    assert ran(host, message) == []


def test_a_cancel_ends_the_running_script(client: Any, host: WorkerHost, redis_url: str) -> None:
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 20})
    submit(client, redis_url, message)
    wait_entry(client, message, entries.Progress, "the job's first progress")
    pids = ran(host, message)
    client.hset(keys.job(message.endpoint, message.id), "canceled", "1")
    client.publish(keys.CANCEL_CHANNEL, f"{message.endpoint}:{message.id}")
    wait_gone(pids, timeout=5)
    end = wait_end(client, message)[-1]
    assert isinstance(end, entries.End) and end.outcome == "canceled"
    images = [e for e in stream_entries(client, message.endpoint, message.id)
              if isinstance(e, entries.Image)]  # fmt: skip
    assert len(images) < 20


def test_a_superseded_attempt_stops_and_adds_nothing_more(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 20})
    before = served(client, host)
    submit(client, redis_url, message)
    wait_entry(client, message, entries.Image, "the job's first image")
    pids = ran(host, message)
    client.hset(keys.job(message.endpoint, message.id), "attempt", "another-host's")
    kept = len(stream_entries(client, message.endpoint, message.id))
    wait_gone(pids, timeout=5)
    wait_until(lambda: served(client, host) == before + 1, "the delivery to end")
    found = stream_entries(client, message.endpoint, message.id)
    assert len(found) == kept
    assert not any(isinstance(e, entries.End) for e in found)


def test_a_job_whose_workers_died_too_often_fails(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    message = job_message("text-to-image", TEXT_TO_IMAGE)
    dead = json.dumps({"host": "gone-host", "pid": 77, "id": "gone"})
    create_job(
        client, message.endpoint, message.id,
        deliveries=str(keys.MAX_DEATHS), worker=dead, deaths="a (pid 1), b (pid 2)",
    )  # fmt: skip
    enqueue(redis_url, message)
    found = wait_end(client, message)
    assert len(found) == 1
    end = found[0]
    assert isinstance(end, entries.End) and end.outcome == "failed"
    assert end.error == "its worker died 3 times: a (pid 1), b (pid 2), gone-host (pid 77)"
    assert ran(host, message) == []


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of the test's own: the module's host must not take the job sent back."""
    reason = redis_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


def test_sigterm_gives_the_job_back_and_leaves_the_registry(
    own_redis: str, tmp_path: Path
) -> None:
    """A resident worker stopped mid-job: `end stopped`, no death counted, its message back
    in the queue at once, and another host finishes the job from the images made."""
    import redis

    redis_url = own_redis
    client = redis.Redis.from_url(redis_url)
    first = WorkerHost(redis_url, tmp_path / "first", ["--heartbeat-timeout", "2"], SLOW)
    first.start(client)
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 6})
    queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
    try:
        submit(client, redis_url, message)
        wait_until(
            lambda: any(
                isinstance(e, entries.Image)
                for e in stream_entries(client, message.endpoint, message.id)
            ),
            "the job's first image",
        )
        assert first.stop(signal.SIGTERM) == 0, first.log()
    finally:
        first.end()
    found = stream_entries(client, message.endpoint, message.id)
    end = found[-1]
    assert isinstance(end, entries.End) and end.outcome == "stopped", found
    state = client.hgetall(keys.job(message.endpoint, message.id))
    assert state[b"deliveries"] == b"0" and b"worker" not in state
    assert queue_length(client, queue) == 1
    assert first.record(client) is None
    assert not (tmp_path / "first" / str(first.process.pid)).exists()
    made = int(state[b"made"])

    second = WorkerHost(redis_url, tmp_path / "second", ["--heartbeat-timeout", "2"])
    try:
        second.start(client)
        found = wait_until(
            lambda: ends(stream_entries(client, message.endpoint, message.id), 2),
            "the second delivery's end",
            30,
        )
    finally:
        second.end()
    last = found[-1]
    assert isinstance(last, entries.End) and last.outcome == "complete"
    images = [e for e in found if isinstance(e, entries.Image)]
    assert [i.n for i in images] == list(range(1, 7))  # each once, the first host's kept
    assert b"deaths" not in client.hgetall(keys.job(message.endpoint, message.id))
    assert made < 6


# --- Redis unreachable mid-delivery: nothing is lost -------------------------------------


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[Callable[[bool], tuple[RedisServer, WorkerHost]]]:
    """Makes a Redis of the test's own, to stop and start again (`persist`: its data survive
    that), and a worker host on it running one process per job."""
    import redis

    reason = redis_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[tuple[RedisServer, WorkerHost]] = []

    def make(persist: bool) -> tuple[RedisServer, WorkerHost]:
        server = RedisServer(tmp_path / "redis", persist=persist).start()
        worker = WorkerHost(
            server.url,
            tmp_path / "worker",
            ["--runner", "process", "--heartbeat-timeout", "2"],
            {**SLOW, "SD_SIM_ARGV_LOG": str(tmp_path / "argv.jsonl")},
        )
        worker.argv_log = tmp_path / "argv.jsonl"  # type: ignore[attr-defined]
        made.append((server, worker))
        worker.start(redis.Redis.from_url(server.url))
        return server, worker

    yield make
    for server, worker in made:
        worker.end()
        server.stop()


def _cut_off_while_it_runs(server: RedisServer, worker: WorkerHost, message: JobMessage) -> None:
    """Redis stops after the job's first image and stays away until its script has ended,
    and a while more (longer than the heartbeat timeout), then comes back."""
    client = server.client()
    wait_entry(client, message, entries.Image, "the job's first image")
    server.stop()
    wait_gone(ran(worker, message), timeout=20)
    time.sleep(3)  # beyond --heartbeat-timeout 2: the host must not give up
    server.start()


def test_a_run_cut_off_from_redis_is_reported_once_redis_is_back(
    outage: Callable[[bool], tuple[RedisServer, WorkerHost]],
) -> None:
    """The script finishes while Redis is away: its images and end wait on the host and go
    through the fence when Redis answers again; every image once, the job complete."""
    server, worker = outage(True)
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 2, "batchSize": 2})
    submit(server.client(), server.url, message)
    _cut_off_while_it_runs(server, worker, message)
    client = server.client()
    found = wait_end(client, message)
    check_complete(found, 4, 42, (256, 256))
    assert client.hget(keys.job(message.endpoint, message.id), "made") == b"4"
    assert len(ran(worker, message)) == 1
    wait_until(lambda: served(client, worker) == 1, "the delivery to be over")
    assert acknowledged(client, message)
    assert list((worker.folder / str(worker.process.pid)).rglob("*.png")) == []  # type: ignore[union-attr]
    said = worker.log()
    assert said.count("Redis cannot take its report") == 1
    assert said.count("Redis answers again") == 1
    # Redis away for seconds: each repeating complaint once at most, not every second per
    # thread (a full host's consumers do not fetch: they may not meet the outage at all).
    assert said.count("Consumer encountered a connection error") <= 1, said
    assert said.count("Restarting consumer") <= 1, said
    assert said.count("listening for cancels") <= 1, said


def test_a_run_whose_job_redis_lost_is_dropped(
    outage: Callable[[bool], tuple[RedisServer, WorkerHost]],
) -> None:
    """Redis comes back empty (no persistence): the job's hash is gone (the API node enqueues
    it again), so the host drops what it kept, adds nothing, and takes jobs again."""
    server, worker = outage(False)
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 4})
    submit(server.client(), server.url, message)
    _cut_off_while_it_runs(server, worker, message)
    client = server.client()
    wait_until(lambda: worker.record(client) and served(client, worker) == 1, "the end")
    assert client.exists(keys.stream(message.endpoint, message.id)) == 0
    assert client.exists(keys.job(message.endpoint, message.id)) == 0
    scratch = worker.folder / str(worker.process.pid)  # type: ignore[union-attr]
    assert [path for path in scratch.rglob("*") if not path.is_dir()] == []
    again = job_message("text-to-image", TEXT_TO_IMAGE)
    submit(client, server.url, again)
    check_complete(wait_end(client, again), 1, 42, (256, 256))


def _deliveries(url: str) -> Any:
    """The actor's body on its own (no run is handed over in these tests), on a real Redis."""
    import redis

    from sd_rest.cluster.broker import make_broker
    from sd_rest.cluster.fence import Fence
    from sd_rest.workerhost.deliveries import Deliveries

    client = redis.Redis.from_url(url)
    ref = entries.WorkerRef("this-host", 4242, "this-host-4242-x")
    broker = make_broker(url, 30.0)
    return Deliveries(Fence(client), client, None, None, [], ref, broker.enqueue)  # type: ignore[arg-type]


def _start_while_redis_is_away(server: RedisServer, message: JobMessage, attempt: str) -> Any:
    """START tried with Redis stopped; Redis started again a moment later; START's answer."""
    import threading

    deliveries = _deliveries(server.url)
    server.stop()
    answers: list[Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(deliveries._start(message.endpoint, message.id, attempt))
    )
    thread.start()
    time.sleep(1)  # a few tries fail
    server.start()
    thread.join(30)
    assert answers, "START never answered once Redis was back"
    return answers[0]


def test_a_start_redis_cannot_take_is_tried_until_it_can(tmp_path: Path) -> None:
    """A delivery whose START meets Redis away is not acknowledged into oblivion: START is
    tried again until Redis answers, and the job runs."""
    reason = redis_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = RedisServer(tmp_path / "redis", persist=True).start()
    try:
        message = job_message("text-to-image", TEXT_TO_IMAGE)
        client = server.client()
        create_job(client, message.endpoint, message.id, made=1)
        start = _start_while_redis_is_away(server, message, "attempt-1")
        assert (start.verdict, start.made, start.delivery) == ("run", 1, 1)
        client = server.client()
        found = stream_entries(client, message.endpoint, message.id)
        assert [type(e) for e in found] == [entries.Started]
        assert client.hget(keys.job(message.endpoint, message.id), "attempt") == b"attempt-1"
    finally:
        server.stop()


def test_a_start_whose_answer_was_lost_is_not_made_twice(tmp_path: Path) -> None:
    """START ran but its answer never came back (Redis went away): the next try finds the
    attempt in the job's hash and runs it, neither starting it again nor counting this host
    as a death of the job."""
    reason = redis_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = RedisServer(tmp_path / "redis", persist=True).start()
    try:
        message = job_message("text-to-image", TEXT_TO_IMAGE)
        client = server.client()
        create_job(client, message.endpoint, message.id)
        _deliveries(server.url).fence.start(
            message.endpoint, message.id, "attempt-1", entries.WorkerRef("this-host", 4242, "x")
        )
        start = _start_while_redis_is_away(server, message, "attempt-1")
        assert (start.verdict, start.made, start.delivery) == ("run", 0, 1)
        client = server.client()
        state = client.hgetall(keys.job(message.endpoint, message.id))
        assert state[b"deliveries"] == b"1" and b"deaths" not in state
        assert len(stream_entries(client, message.endpoint, message.id)) == 1
    finally:
        server.stop()


def _while_redis_refuses_writes(client: Any, call: Callable[[], Any]) -> Any:
    """`call()` in a thread while Redis answers every write with an OOM error reply, lifted a
    moment later; what it returned (failing the test when it raised or never returned)."""
    import threading

    answers: list[Any] = []
    refusing = RefusingWrites(client)
    try:
        thread = threading.Thread(target=lambda: answers.append(call()))
        thread.start()
        time.sleep(1)  # a few tries are refused
    finally:
        refusing.lift()
    thread.join(30)
    assert answers, "it never answered once Redis took writes again"
    return answers[0]


def test_a_start_redis_refuses_is_tried_until_it_takes_it(own_redis: str) -> None:
    """An error reply (OOM; MISCONF and READONLY alike) on START is not a job lost: START is
    tried again until Redis takes it, and the job runs."""
    import redis

    client = redis.Redis.from_url(own_redis)
    message = job_message("text-to-image", TEXT_TO_IMAGE)
    create_job(client, message.endpoint, message.id, made=1)
    deliveries = _deliveries(own_redis)
    start = _while_redis_refuses_writes(
        client, lambda: deliveries._start(message.endpoint, message.id, "attempt-1")
    )
    assert (start.verdict, start.made, start.delivery) == ("run", 1, 1)
    assert [type(e) for e in stream_entries(client, message.endpoint, message.id)] == [
        entries.Started
    ]


def test_a_failure_redis_refuses_is_tried_until_it_takes_it(own_redis: str) -> None:
    import redis

    client = redis.Redis.from_url(own_redis)
    message = job_message("text-to-image", TEXT_TO_IMAGE)
    create_job(client, message.endpoint, message.id)
    deliveries = _deliveries(own_redis)
    deliveries.fence.start(message.endpoint, message.id, "attempt-1", deliveries.ref)
    _while_redis_refuses_writes(
        client,
        lambda: deliveries._fail(message.endpoint, message.id, "attempt-1", "no good") or True,
    )
    end = stream_entries(client, message.endpoint, message.id)[-1]
    assert end == entries.End("attempt-1", "failed", "no good", "")


def test_a_job_sent_again_is_sent_however_long_redis_refuses_it(own_redis: str) -> None:
    """A job given back (the host stopping, or Redis's count behind it) is on its queue again
    once Redis takes writes, and its hash names the new message (what a cancel takes back)."""
    import redis

    client = redis.Redis.from_url(own_redis)
    message = job_message("text-to-image", TEXT_TO_IMAGE)
    create_job(client, message.endpoint, message.id, message="the-first-one")
    deliveries = _deliveries(own_redis)
    _while_redis_refuses_writes(client, lambda: deliveries._send_again(message) or True)
    queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
    ids, _ = keys.dramatiq_queue(queue)
    assert client.lrange(ids, 0, -1) == [client.hget(keys.job(message.endpoint, message.id),
                                                     "message")]  # fmt: skip


def test_a_report_redis_refuses_is_sent_once_it_takes_it(
    outage: Callable[[bool], tuple[RedisServer, WorkerHost]],
) -> None:
    """Redis out of memory mid-run (streams full of PNGs while the API node is down): the
    images and the end wait on the host and go once Redis takes writes; the job completes."""
    server, worker = outage(True)
    client = server.client()
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 2, "batchSize": 2})
    submit(client, server.url, message)
    job = keys.job(message.endpoint, message.id)
    wait_until(lambda: int(client.hget(job, "made")) >= 1, "the first image")
    refusing = RefusingWrites(client)
    try:
        time.sleep(1.5)  # the next images are made meanwhile, and refused
    finally:
        refusing.lift()
    check_complete(wait_end(client, message), 4, 42, (256, 256))
    assert "Redis cannot take its report" in worker.log()


def test_an_image_redis_did_not_count_sends_the_job_again(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    """Redis back from an older snapshot: its `made` behind the run's images. The host ends
    the attempt `stopped` (not a death) and sends the job again, which resumes at Redis's
    `made`: the job completes (the API node skips the images it already kept)."""
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 4})
    submit(client, redis_url, message)
    job = keys.job(message.endpoint, message.id)
    wait_until(lambda: int(client.hget(job, "made")) >= 1, "the first image")
    client.hset(job, "made", "0")
    found = wait_until(
        lambda: ends(stream_entries(client, message.endpoint, message.id), 2), "two ends"
    )
    first, second = (e for e in found if isinstance(e, entries.End))
    assert first.outcome == "stopped" and second.outcome == "complete"
    restarts = [e for e in found if isinstance(e, entries.Started)]
    assert [s.delivery for s in restarts] == [1, 1]  # the stopped one was no death
    again = [e.n for e in found if isinstance(e, entries.Image) and e.attempt == second.attempt]
    assert again == [1, 2, 3, 4]
    assert b"deaths" not in client.hgetall(job)
    queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
    wait_until(lambda: acknowledged(client, message), "both deliveries acknowledged")
    assert client.hget(job, "message") not in (None, b"")  # the message sent again
    assert queue_length(client, queue) == 0


def test_an_unreadable_scratch_image_sends_the_job_again(
    outage: Callable[[bool], tuple[RedisServer, WorkerHost]],
) -> None:
    """An image whose scratch file is gone before it could be sent is made again: the attempt
    ends `stopped` and the job, sent again, resumes after the images Redis has."""
    server, worker = outage(True)
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 4})
    submit(server.client(), server.url, message)
    client = server.client()
    wait_until(
        lambda: any(isinstance(e, entries.Image)
                    for e in stream_entries(client, message.endpoint, message.id)),
        "the job's first image",
    )  # fmt: skip
    server.stop()
    wait_gone(ran(worker, message), timeout=20)
    pid = worker.process.pid  # type: ignore[union-attr]
    job_dir = worker.folder / str(pid) / message.endpoint / message.id
    # The last image published: the ones made while Redis was away wait here to be sent.
    wait_until(lambda: (job_dir / "4.png").exists(), "the last image kept on the host")
    for path in job_dir.glob("*.png"):
        path.unlink()
    server.start()
    client = server.client()
    found = wait_until(
        lambda: ends(stream_entries(client, message.endpoint, message.id), 2), "two ends", 60
    )
    first, second = (e for e in found if isinstance(e, entries.End))
    assert first.outcome == "stopped" and second.outcome == "complete"
    made = [e.n for e in found if isinstance(e, entries.Image)]
    assert made == [1, 2, 3, 4]  # each once: the second delivery resumed after Redis's made
    assert client.hget(keys.job(message.endpoint, message.id), "made") == b"4"


def test_a_failure_after_start_ends_the_job_failed(
    client: Any, host: WorkerHost, redis_url: str
) -> None:
    """The host cannot write the job's input files (here its scratch folder has a file where
    the job's folder goes; a full disk alike): the job ends failed, not started for ever."""
    inputs = ENDPOINTS["image-to-image"].prepare_inputs({"image": png_bytes(256, 256)})
    message = job_message("image-to-image", {"prompt": "a boat", "steps": 8}, inputs)
    scratch = host.folder / str(host.process.pid) / message.endpoint  # type: ignore[union-attr]
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / message.id).write_bytes(b"in the way")
    try:
        submit(client, redis_url, message)
        end = wait_end(client, message)[-1]
    finally:
        (scratch / message.id).unlink(missing_ok=True)
    assert isinstance(end, entries.End) and end.outcome == "failed"
    assert end.error is not None and "internal error on the worker host" in end.error
    assert ran(host, message) == []


def test_a_full_host_fetches_the_moment_a_slot_is_free(own_redis: str) -> None:
    """A full host's consumer waits for a slot and then fetches, rather than answering
    nothing (which Dramatiq counts as an empty queue: it backs off, and a host that was busy
    for a while would take its next job up to a second late)."""
    import threading

    from sd_rest.cluster.broker import make_broker
    from sd_rest.workerhost.capacity import GatedBroker, Slots

    message = job_message("text-to-image", TEXT_TO_IMAGE)
    enqueue(own_redis, message)
    queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
    broker = make_broker(own_redis, 30.0)
    slots = Slots(1)
    assert slots.take(1) == 1  # the host is full
    gated = GatedBroker(broker, slots, delay=False, wait=30.0)
    fetched: list[list[bytes]] = []
    thread = threading.Thread(target=lambda: fetched.append(gated.do_fetch(queue, 1)))
    thread.start()
    time.sleep(0.3)
    assert fetched == []  # still waiting for the slot
    slots.give_back(1)
    thread.join(30)
    broker.close()
    assert len(fetched) == 1 and len(fetched[0]) == 1 and slots.free == 0


def test_a_restarted_host_takes_its_checkpoints_digests_from_the_cache(
    redis_url: str, tmp_path: Path
) -> None:
    """A 4 GB checkpoint is read once, not at every start: the second start takes the digest
    the first left in SD_REST_WORKER_DIR/checkpoints.json (here made recognisable)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    folder = tmp_path / "worker"
    first = WorkerHost(redis_url, folder, ["--runner", "process"])
    try:
        first.start(client)
    finally:
        first.end()
    cache = folder / "checkpoints.json"
    doc = json.loads(cache.read_text())
    assert len(doc["files"]) == 2
    for entry in doc["files"].values():
        entry["sha256"] = "f" * 64  # what hashing the file again could never give
    cache.write_text(json.dumps(doc))
    second = WorkerHost(redis_url, folder, ["--runner", "process"])
    try:
        second.start(client)
        record = second.record(client)
    finally:
        second.end()
    assert record is not None
    assert {model["sha256"] for model in record["models"]} == {"f" * 64}


def test_a_host_running_two_jobs_lists_both(own_redis: str, tmp_path: Path) -> None:
    """--concurrency 2: both jobs run at once, the record says busy with both, then idle
    with none, each job complete."""
    import redis

    client = redis.Redis.from_url(own_redis)
    worker = WorkerHost(
        own_redis, tmp_path / "worker",
        ["--runner", "process", "--concurrency", "2", "--heartbeat-timeout", "2"], SLOW,
    )  # fmt: skip
    fields = {**TEXT_TO_IMAGE, "iterations": 2, "batchSize": 2}
    messages = [job_message("text-to-image", fields) for _ in "ab"]
    try:
        worker.start(client)
        for message in messages:
            submit(client, own_redis, message)

        def both() -> dict[str, Any] | None:
            record = worker.record(client)
            return record if record is not None and len(record["jobs"]) == 2 else None

        record = wait_until(both, "both jobs in the record")
        assert record["state"] == "busy" and record["concurrency"] == 2
        assert sorted(job["id"] for job in record["jobs"]) == sorted(m.id for m in messages)
        for message in messages:
            check_complete(wait_end(client, message), 4, 42, (256, 256))
        wait_until(
            lambda: (worker.record(client) or {}).get("jobs") == [], "the record to say idle"
        )
        record = worker.record(client)
        assert record is not None and record["state"] == "idle" and record["served"] == 2
    finally:
        worker.end()


# --- liveness and held messages: a busy host is neither declared dead nor holding work -----


def _text_to_image_only(tmp_path: Path) -> list[str]:
    """A host holding only the text-to-image checkpoint: it consumes that checkpoint's queues
    and no other (the job below is enqueued to its `sha-…` one)."""
    return ["--inpaint-image-model", str(tmp_path / "no-inpaint.ckpt")]


def test_a_busy_host_is_not_declared_dead(own_redis: str, tmp_path: Path) -> None:
    """A job longer than 3x the heartbeat timeout on a host whose only queue is busy, another
    host live on the same queue (its fetches run Dramatiq's maintenance, which hands a silent
    host's messages to others): the job is delivered once, whatever fetching the busy host
    does, because its heartbeat thread records Dramatiq's heartbeat too."""
    import redis

    client = redis.Redis.from_url(own_redis)
    hosts = [
        WorkerHost(own_redis, tmp_path / name,
                   ["--heartbeat-timeout", "2", *_text_to_image_only(tmp_path)], SLOW)
        for name in ("a", "b")
    ]  # fmt: skip
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 20})  # ~8 s
    try:
        for worker in hosts:
            worker.start(client)
            record = worker.record(client)
            assert record is not None and [m["model"] for m in record["models"]] == [
                "text-to-image"
            ]
        submit(client, own_redis, message)
        found = wait_end(client, message, timeout=90)
    finally:
        for worker in hosts:
            worker.end()
    assert client.hget(keys.job(message.endpoint, message.id), "deliveries") == b"1"
    assert sum(isinstance(e, entries.Started) for e in found) == 1
    end = found[-1]
    assert isinstance(end, entries.End) and end.outcome == "complete", found
    assert [e.n for e in found if isinstance(e, entries.Image)] == list(range(1, 21))


def _images(client: Any, message: JobMessage) -> int:
    found = stream_entries(client, message.endpoint, message.id)
    return sum(isinstance(e, entries.Image) for e in found)


def test_a_busy_host_holds_no_other_job(own_redis: str, tmp_path: Path) -> None:
    """--concurrency 1, busy with a text-to-image job: the inpaint job sent meanwhile stays in
    its queue (the busy host's inpaint consumer does not fetch it to hold it), and a host
    started then runs it at once, while the first job is still running."""
    import redis

    client = redis.Redis.from_url(own_redis)
    first = WorkerHost(own_redis, tmp_path / "a", ["--heartbeat-timeout", "2"], SLOW)
    second = WorkerHost(own_redis, tmp_path / "b", ["--heartbeat-timeout", "2"], SLOW)
    fields = {**TEXT_TO_IMAGE, "iterations": 30, "batchSize": 2}  # ~24 s
    long_one = job_message("text-to-image", fields)
    inputs = ENDPOINTS["inpaint-image"].prepare_inputs(
        {"image": png_bytes(256, 256), "mask": mask_bytes(256, 256)}
    )
    other = job_message("inpaint-image", {"steps": 8}, inputs)
    other_queue = keys.queue_for(other.checkpoint.name, other.checkpoint.sha256)
    try:
        first.start(client)
        submit(client, own_redis, long_one)
        wait_until(lambda: _images(client, long_one) >= 1, "the long job's first image")
        submit(client, own_redis, other)
        # A few images more of the long job: time enough for an idle consumer to fetch.
        made = _images(client, long_one)
        wait_until(lambda: _images(client, long_one) >= made + 3, "three more images")
        assert queue_length(client, other_queue) == 1, first.log()
        second.start(client)
        found = wait_end(client, other, timeout=60)
        assert not any(
            isinstance(e, entries.End) for e in stream_entries(client, "text-to-image", long_one.id)
        ), "the inpaint job waited for the first host"
    finally:
        client.hset(keys.job(long_one.endpoint, long_one.id), "canceled", "1")
        client.publish(keys.CANCEL_CHANNEL, f"{long_one.endpoint}:{long_one.id}")
        for worker in (first, second):
            worker.end()
    started = found[0]
    assert isinstance(started, entries.Started)
    assert second.process is not None and started.worker.pid == second.process.pid
    assert isinstance(found[-1], entries.End) and found[-1].outcome == "complete"


# --- the host's own threads go on whatever fails ------------------------------------------


def test_the_heartbeat_goes_on_when_the_record_cannot_be_encoded(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A record json cannot encode (bytes where text belongs) on the 2nd and 3rd beats: the
    failure is logged once with its traceback, Dramatiq's heartbeat is written all the same,
    the last record stays listed, and the beats go on."""
    import logging

    import redis

    from sd_rest.workerhost import heartbeat

    caplog.set_level(logging.INFO)
    client = redis.Redis.from_url(redis_url)
    beats: list[float | None] = []  # Dramatiq's heartbeat as each record is made

    def describe() -> dict[str, Any]:
        beats.append(client.zscore(keys.DRAMATIQ_HEARTBEATS, "dramatiq-1"))
        models = [{"sha256": b"\x00"}] if len(beats) in (2, 3) else []
        return heartbeat.record("w-1", "h", 1, [], models, len(beats), 1, "process")

    beat = heartbeat.Heartbeat(client, "w-1", 1.0, describe, "dramatiq-1")
    beat.start()
    try:
        wait_until(lambda: len(beats) >= 6, "the beats after the failures")
        raw = client.get(keys.worker("w-1"))
    finally:
        beat.stop()
    assert raw is not None and json.loads(raw)["served"] >= 4
    scores = [score for score in beats[1:6] if score is not None]
    assert len(scores) == 5 and scores == sorted(set(scores))  # written at every beat
    failures = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert failures[0].exc_info[0] is TypeError
    assert "the registry record is written again" in caplog.text


def test_the_cancel_listener_goes_on_after_a_failed_cancel(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancel whose handling fails (here the first one) is logged with its traceback; the
    next cancels still arrive."""
    import redis

    from sd_rest.workerhost.cancels import CancelListener

    client = redis.Redis.from_url(redis_url)
    received: list[tuple[str, str]] = []

    def on_cancel(endpoint: str, job_id: str) -> None:
        received.append((endpoint, job_id))
        if job_id == "first":
            raise RuntimeError("the loop is closed")

    listener = CancelListener(client, on_cancel)
    listener.start()
    try:
        client.publish(keys.CANCEL_CHANNEL, "text-to-image:first")
        wait_until(lambda: received, "the first cancel")
        client.publish(keys.CANCEL_CHANNEL, "text-to-image:second")
        wait_until(lambda: len(received) == 2, "the second cancel", timeout=5)
    finally:
        listener.stop()
    assert received == [("text-to-image", "first"), ("text-to-image", "second")]
    failed = [r for r in caplog.records if r.exc_info is not None]
    assert len(failed) == 1 and "text-to-image/first" in failed[0].getMessage()
