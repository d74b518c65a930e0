"""Driving real worker hosts without an API node: `python -m sd_rest worker --demo` processes,
each job's hash and consumer group made as the API node makes them (cluster.md), a real
Dramatiq message enqueued, and the job's stream read back with redis-py and decoded with
cluster/entries.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_rest.api.validation import validate_params
from sd_rest.cluster import entries, keys
from sd_rest.cluster.message import Checkpoint, JobMessage, dramatiq_message
from sd_rest.endpoints import ENDPOINTS

from helpers import DEMO_MODELS, FAST_SIMULATOR, wait_until

TEXT_TO_IMAGE = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 8}


def demo_checkpoint(model: str) -> Checkpoint:
    """The checkpoint a demo API node names: the simulator's placeholder, by its digest."""
    path = DEMO_MODELS / f"{model}.ckpt"
    return Checkpoint(path.name, hashlib.sha256(path.read_bytes()).hexdigest())


def job_message(
    endpoint: str,
    fields: dict[str, Any],
    inputs: dict[str, bytes] | None = None,
    checkpoint: Checkpoint | None = None,
) -> JobMessage:
    spec = ENDPOINTS[endpoint]
    params = validate_params(endpoint, list(fields.items()), spec.files)
    return JobMessage(
        endpoint=endpoint,
        id=uuid.uuid4().hex,
        params=params,
        checkpoint=checkpoint or demo_checkpoint(spec.model.value),
        inputs=inputs or {},
    )


def create_job(client: Any, endpoint: str, job_id: str, made: int = 0, **extra: str) -> None:
    """The job's hash and its stream's consumer group, as the API node makes them."""
    client.delete(keys.stream(endpoint, job_id))
    client.hset(
        keys.job(endpoint, job_id),
        mapping={
            "queue": "",
            "made": str(made),
            "done": str(made),
            "deliveries": "0",
            "canceled": "0",
            "enqueued": "0",
            **extra,
        },
    )
    client.xgroup_create(keys.stream(endpoint, job_id), keys.GROUP, id="0", mkstream=True)


def enqueue(url: str, message: JobMessage, payload: Any = None) -> None:
    """A real Dramatiq message on the queue the job's checkpoint names (`payload` instead of
    the message's JSON: a damaged one)."""
    from sd_rest.cluster.broker import make_broker

    broker = make_broker(url, 30.0)
    try:
        queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
        sent = dramatiq_message(queue, message)
        if payload is not None:
            sent = sent.copy(args=(payload,))
        broker.enqueue(sent)
    finally:
        broker.close()


def submit(client: Any, url: str, message: JobMessage, made: int = 0) -> None:
    create_job(client, message.endpoint, message.id, made)
    enqueue(url, message)
    client.hset(keys.job(message.endpoint, message.id), "enqueued", "1")


def stream_entries(client: Any, endpoint: str, job_id: str) -> list[entries.Entry]:
    raw = client.xrange(keys.stream(endpoint, job_id))
    return [entries.decode(fields) for _, fields in raw]


def wait_entry(client: Any, message: JobMessage, kind: type, what: str) -> None:
    """Until the job's stream holds an entry of `kind` (entries.Progress, entries.Image…)."""
    wait_until(
        lambda: any(
            isinstance(e, kind) for e in stream_entries(client, message.endpoint, message.id)
        ),
        what,
    )


def wait_end(client: Any, message: JobMessage, timeout: float = 30.0) -> list[entries.Entry]:
    """The job's entries once its stream holds an end."""

    def ended() -> list[entries.Entry] | None:
        found = stream_entries(client, message.endpoint, message.id)
        return found if any(isinstance(e, entries.End) for e in found) else None

    return wait_until(ended, f"the end of {message.endpoint}/{message.id}", timeout)


def queue_length(client: Any, queue: str) -> int:
    return int(client.llen(f"{keys.DRAMATIQ_NAMESPACE}:{queue}"))


@dataclass
class WorkerHost:
    """`python -m sd_rest worker --demo --broker URL ...` as a real process."""

    url: str
    folder: Path  # its SD_REST_WORKER_DIR, and its log beside
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, client: Any | None = None) -> WorkerHost:
        """Started; with `client`, once its registry record is there (it takes jobs)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **FAST_SIMULATOR, "SD_REST_WORKER_DIR": str(self.folder)}
        env.update(self.env)
        self.log_path = self.folder.parent / f"worker-{time.time_ns()}.log"
        command = [sys.executable, "-m", "sd_rest", "worker", "--demo", "--broker", self.url]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, *self.args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if client is not None:
            wait_until(lambda: self.record(client) or self._exited(), "the worker's record")
            assert self.record(client), f"the worker exited:\n{self.log()}"
        return self

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def record(self, client: Any) -> dict[str, Any] | None:
        """Its registry record, if there."""
        for member in client.smembers(keys.WORKERS):
            raw = client.get(keys.worker(member.decode()))
            if raw is not None:
                doc = json.loads(raw)
                if self.process is not None and doc["pid"] == self.process.pid:
                    return doc
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def end(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class RefusingWrites:
    """Redis out of memory (maxmemory 1 byte, noeviction): every write answers an OOM error
    reply, as under maxmemory while streams fill with PNGs, until `lift`."""

    def __init__(self, client: Any) -> None:
        self.client = client
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")

    def lift(self) -> None:
        self.client.config_set("maxmemory", "0")
