"""What the API node and the worker hosts exchange, as pure data: the job message, the stream
entries, the broker's URL and queue names. (Redis and Dramatiq are in the other cluster tests.)"""

from __future__ import annotations

import base64

import pytest

from sd_rest.cluster import broker, entries, keys
from sd_rest.cluster.message import BadMessage, Checkpoint, JobMessage

JOB_ID = "0123456789abcdef0123456789abcdef"


def wire(fields: entries.Fields) -> dict[bytes, bytes]:
    """As redis-py hands an entry back: bytes keys and values."""
    out = {}
    for key, value in fields.items():
        out[key.encode()] = value if isinstance(value, bytes) else str(value).encode()
    return out


def test_entries_round_trip() -> None:
    ref = entries.WorkerRef("gpu-2.local", 4242, "w1")
    assert entries.decode(wire(entries.started("a1", ref, 2))) == entries.Started("a1", ref, 2)
    assert entries.decode(wire(entries.progress("a1", 3, 0.25))) == entries.Progress(
        "a1", 3, 0.25
    )
    png = bytes(range(256)) * 10
    assert entries.decode(wire(entries.image("a1", 2, 77, 1, png))) == entries.Image(
        "a1", 2, 77, 1, png
    )
    end = entries.decode(wire(entries.end("a1", "failed", "boom", b"x" * 10_000)))
    assert end == entries.End("a1", "failed", "boom", "x" * entries.LOG_TAIL_BYTES)
    assert entries.decode(wire(entries.end("a1", "complete", None, b""))).error is None


@pytest.mark.parametrize(
    "raw",
    [
        {b"kind": b"started", b"attempt": b"a"},  # no worker
        {b"kind": b"progress", b"attempt": b"a", b"index": b"x", b"fraction": b"0.5"},
        {b"kind": b"end", b"attempt": b"a", b"outcome": b"exploded"},
        {b"kind": b"gossip", b"attempt": b"a"},
        {b"attempt": b"a"},
        {b"kind": b"started", b"attempt": b"a", b"worker": b"[1]", b"delivery": b"1"},
        {b"kind": b"image", b"attempt": b"\xff", b"n": b"1", b"seed": b"1", b"position": b"1",
         b"png": b""},
    ],
)
def test_entries_that_are_not_ours_are_refused(raw: dict[bytes, bytes]) -> None:
    with pytest.raises(entries.BadEntry):
        entries.decode(raw)


def message(**changes: object) -> dict[str, object]:
    doc = JobMessage(
        "inpaint-image",
        JOB_ID,
        {"steps": 2, "seed": 5},
        Checkpoint("sd-v1-5-inpainting.ckpt", "ab" * 32),
        {"image": b"\x89PNG image", "mask": b"\x89PNG mask"},
    ).to_json()
    doc.update(changes)
    return doc


def test_the_job_message_round_trips() -> None:
    back = JobMessage.from_json(message())
    assert back.inputs == {"image": b"\x89PNG image", "mask": b"\x89PNG mask"}
    assert back.checkpoint == Checkpoint("sd-v1-5-inpainting.ckpt", "ab" * 32)
    assert back.to_json() == message()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"version": 99}, "version"),
        ({"endpoint": "../etc"}, "endpoint"),
        ({"id": "../../x"}, "id"),
        ({"id": JOB_ID.upper()}, "id"),
        ({"params": []}, "params"),
        ({"checkpoint": {"sha256": None}}, "checkpoint"),
        ({"inputs": {"image": "aGk="}}, "input files"),  # the mask is missing
        ({"inputs": {"image": "aGk=", "mask": "aGk=", "../x": "aGk="}}, "input files"),
        ({"inputs": {"image": "not base64!", "mask": "aGk="}}, "base64"),
    ],
)
def test_a_message_a_worker_must_not_run(changes: dict[str, object], words: str) -> None:
    with pytest.raises(BadMessage, match=words):
        JobMessage.from_json(message(**changes))


def test_inputs_travel_as_base64() -> None:
    assert message()["inputs"]["image"] == base64.b64encode(b"\x89PNG image").decode()


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "rediss://:pw@10.0.0.2:6380/3", "redis://gpu-box"],
)
def test_broker_urls_redis_takes(url: str) -> None:
    assert broker.check_url(url) == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("amqp://guest@localhost//", "redis:// or rediss://"),
        ("redis://", "names no host"),
        ("redis://host:99999/0", "bad port"),
        ("redis://host/zero", "database must be a number"),
    ],
)
def test_broker_urls_refused_in_one_line(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        broker.check_url(url)
    assert "\n" not in str(caught.value)


def test_passwords_never_reach_a_message() -> None:
    assert broker.redact("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert broker.redact("redis://host:6379/0") == "redis://host:6379/0"
    with pytest.raises(ValueError) as caught:
        broker.check_url("amqp://user:hunter2@host/")
    assert "hunter2" not in str(caught.value)


def test_queue_names() -> None:
    digest = "0f" * 32
    assert keys.queue_for("model.ckpt", digest) == f"sha-{digest[:32]}"
    assert keys.queue_for("model.ckpt", digest) == keys.queue_for("other.ckpt", digest)
    assert keys.queue_for("my model (v2).ckpt", None) == "name-my_model__v2_.ckpt"
    assert keys.job("text-to-image", JOB_ID) != keys.stream("text-to-image", JOB_ID)
