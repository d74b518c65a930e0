"""The fence's two Lua scripts (cluster/fence.py) against a real redis-server: each rule of
START and ADD, and the stream they leave."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sd_rest.cluster import entries, keys
from sd_rest.cluster.fence import (
    ADDED,
    CANCELED,
    OUT_OF_ORDER,
    SUPERSEDED,
    AsyncFence,
    Fence,
    Start,
)

ENDPOINT, JOB = "text-to-image", "ab" * 16
HOST_A = entries.WorkerRef("host-a", 101, "a1")
HOST_B = entries.WorkerRef("host-b", 202, "b2")


@pytest.fixture
def client(redis_url: str) -> Any:
    import redis

    return redis.Redis.from_url(redis_url)


@pytest.fixture
def fence(client: Any) -> Fence:
    return Fence(client)


def make_job(client: Any, made: int = 0, **fields: str) -> None:
    """The hash as the API node creates it at enqueue (cluster.md)."""
    client.hset(
        keys.job(ENDPOINT, JOB),
        mapping={
            "queue": "sha-x",
            "made": str(made),
            "deliveries": "0",
            "canceled": "0",
            "enqueued": "1",
            **fields,
        },
    )


def job_hash(client: Any) -> dict[str, str]:
    raw = client.hgetall(keys.job(ENDPOINT, JOB))
    return {k.decode(): v.decode() for k, v in raw.items()}


def stream(client: Any) -> list[entries.Entry]:
    return [entries.decode(fields) for _, fields in client.xrange(keys.stream(ENDPOINT, JOB))]


def test_start_of_a_missing_job_is_gone_and_adds_nothing(client: Any, fence: Fence) -> None:
    assert fence.start(ENDPOINT, JOB, "t1", HOST_A) == Start("gone")
    assert stream(client) == []
    assert not client.exists(keys.job(ENDPOINT, JOB))


def test_start_of_a_canceled_job_is_dropped_without_a_delivery(client: Any, fence: Fence) -> None:
    make_job(client, canceled="1")
    assert fence.start(ENDPOINT, JOB, "t1", HOST_A) == Start("canceled")
    assert job_hash(client)["deliveries"] == "0"
    assert stream(client) == []


def test_start_sets_the_attempt_and_adds_started(client: Any, fence: Fence) -> None:
    make_job(client, made=2)
    assert fence.start(ENDPOINT, JOB, "t1", HOST_A) == Start("run", made=2, delivery=1)
    state = job_hash(client)
    assert state["attempt"] == "t1"
    assert json.loads(state["worker"]) == HOST_A.to_json()
    assert state["deliveries"] == "1"
    assert "deaths" not in state  # the first delivery: nobody died
    assert stream(client) == [entries.Started("t1", HOST_A, 1)]


def test_a_second_delivery_counts_the_previous_worker_as_dead(client: Any, fence: Fence) -> None:
    make_job(client)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    assert fence.start(ENDPOINT, JOB, "t2", HOST_B) == Start("run", made=0, delivery=2)
    state = job_hash(client)
    assert state["deaths"] == "host-a (pid 101)"
    assert state["attempt"] == "t2"
    assert [type(e) for e in stream(client)] == [entries.Started, entries.Started]


def test_past_max_deaths_the_job_ends_failed_naming_the_dead(client: Any, fence: Fence) -> None:
    make_job(client)
    hosts = [entries.WorkerRef(f"h{i}", i, f"w{i}") for i in range(keys.MAX_DEATHS + 1)]
    for i, host in enumerate(hosts[:-1]):
        assert fence.start(ENDPOINT, JOB, f"t{i}", host).verdict == "run"
    assert fence.start(ENDPOINT, JOB, "last", hosts[-1]) == Start("dead")
    last = stream(client)[-1]
    assert last == entries.End(
        "last",
        "failed",
        f"its worker died {keys.MAX_DEATHS} times: h0 (pid 0), h1 (pid 1), h2 (pid 2)",
        "",
    )
    # The dead attempt is current: the API node takes its end.
    assert job_hash(client)["attempt"] == "last"


def notices(client: Any) -> list[bytes]:
    return [fields.get(b"job") for _, fields in client.xrange(keys.NOTIFY)]


def test_start_tells_the_api_node_a_worker_started_the_job(client: Any, fence: Fence) -> None:
    make_job(client)
    assert fence.start(ENDPOINT, JOB, "t1", HOST_A).verdict == "run"
    assert notices(client) == [keys.stream(ENDPOINT, JOB).encode()]
    for _ in range(keys.MAX_DEATHS):  # the end of a job whose workers died: told as well
        fence.start(ENDPOINT, JOB, "t2", HOST_B)
    assert len(notices(client)) == 1 + keys.MAX_DEATHS
    client.delete(keys.NOTIFY)
    client.hset(keys.job(ENDPOINT, JOB), "canceled", "1")  # dropped: nothing to read
    assert fence.start(ENDPOINT, JOB, "t3", HOST_A).verdict == "canceled"
    assert fence.start(ENDPOINT, "cd" * 16, "t4", HOST_A).verdict == "gone"
    assert notices(client) == []


def test_add_of_the_current_attempt_is_added(client: Any, fence: Fence) -> None:
    make_job(client)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    assert fence.add(ENDPOINT, JOB, "t1", entries.progress("t1", 1, 0.5)) == ADDED
    assert stream(client)[-1] == entries.Progress("t1", 1, 0.5)


def test_add_of_another_attempt_is_superseded(client: Any, fence: Fence) -> None:
    make_job(client)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    fence.start(ENDPOINT, JOB, "t2", HOST_B)
    for fields in (
        entries.progress("t1", 1, 0.5),
        entries.image("t1", 1, 42, 1, b"png"),
        entries.end("t1", "complete", None, b""),
    ):
        assert fence.add(ENDPOINT, JOB, "t1", fields) == SUPERSEDED
    assert [type(e) for e in stream(client)] == [entries.Started, entries.Started]
    assert job_hash(client)["made"] == "0"


def test_add_to_a_deleted_job_is_superseded(client: Any, fence: Fence) -> None:
    make_job(client)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    client.delete(keys.job(ENDPOINT, JOB), keys.stream(ENDPOINT, JOB))
    assert fence.add(ENDPOINT, JOB, "t1", entries.progress("t1", 1, 0.5)) == SUPERSEDED
    assert not client.exists(keys.stream(ENDPOINT, JOB))


def test_a_canceled_job_takes_only_its_end(client: Any, fence: Fence) -> None:
    make_job(client)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    client.hset(keys.job(ENDPOINT, JOB), "canceled", "1")
    assert fence.add(ENDPOINT, JOB, "t1", entries.progress("t1", 1, 0.5)) == CANCELED
    assert fence.add(ENDPOINT, JOB, "t1", entries.image("t1", 1, 42, 1, b"png")) == CANCELED
    assert fence.add(ENDPOINT, JOB, "t1", entries.end("t1", "canceled", None, b"")) == ADDED
    assert [type(e) for e in stream(client)] == [entries.Started, entries.End]


def test_images_go_in_order_once_and_set_made(client: Any, fence: Fence) -> None:
    make_job(client, made=1)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    png = bytes(range(256)) * 4  # any bytes survive the script's arguments
    # Out of order (Redis's `made` is not the run's): a code of its own, the run is sent again.
    assert fence.add(ENDPOINT, JOB, "t1", entries.image("t1", 1, 42, 1, png)) == OUT_OF_ORDER
    assert fence.add(ENDPOINT, JOB, "t1", entries.image("t1", 3, 43, 2, png)) == OUT_OF_ORDER
    assert job_hash(client)["made"] == "1" and len(stream(client)) == 1
    assert fence.add(ENDPOINT, JOB, "t1", entries.image("t1", 2, 43, 1, png)) == ADDED
    assert job_hash(client)["made"] == "2"
    assert stream(client)[-1] == entries.Image("t1", 2, 43, 1, png)


def test_resent_names_the_new_message_of_a_job_still_there(client: Any, fence: Fence) -> None:
    make_job(client, message="old-id")
    assert fence.resent(ENDPOINT, JOB, "new-id") is True
    assert job_hash(client)["message"] == "new-id"
    client.delete(keys.job(ENDPOINT, JOB))
    assert fence.resent(ENDPOINT, JOB, "newer-id") is False
    assert client.exists(keys.job(ENDPOINT, JOB)) == 0  # a job gone is not made again


def test_end_stopped_gives_back_the_delivery_and_is_no_death(client: Any, fence: Fence) -> None:
    make_job(client)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    end = entries.end("t1", "stopped", None, b"log tail")
    assert fence.add(ENDPOINT, JOB, "t1", end) == ADDED
    state = job_hash(client)
    assert state["deliveries"] == "0"
    assert "worker" not in state
    assert fence.start(ENDPOINT, JOB, "t2", HOST_B) == Start("run", made=0, delivery=1)
    assert "deaths" not in job_hash(client)
    assert stream(client)[1] == entries.End("t1", "stopped", None, "log tail")


def test_other_ends_keep_the_delivery(client: Any, fence: Fence) -> None:
    make_job(client)
    fence.start(ENDPOINT, JOB, "t1", HOST_A)
    assert fence.add(ENDPOINT, JOB, "t1", entries.end("t1", "failed", "boom", b"")) == ADDED
    state = job_hash(client)
    assert state["deliveries"] == "1"
    assert json.loads(state["worker"]) == HOST_A.to_json()


def test_the_asyncio_wrapper_runs_the_same_scripts(redis_url: str, client: Any) -> None:
    import redis.asyncio

    make_job(client)

    async def main() -> tuple[Start, int, int]:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        try:
            fence = AsyncFence(aclient)
            started = await fence.start(ENDPOINT, JOB, "t1", HOST_A)
            image = entries.image("t1", 1, 42, 1, b"png")
            return started, await fence.add(ENDPOINT, JOB, "t1", image), await fence.add(
                ENDPOINT, JOB, "t0", entries.progress("t0", 1, 0.1)
            )
        finally:
            await aclient.aclose()

    assert asyncio.run(main()) == (Start("run", 0, 1), ADDED, SUPERSEDED)
    assert stream(client)[-1] == entries.Image("t1", 1, 42, 1, b"png")
