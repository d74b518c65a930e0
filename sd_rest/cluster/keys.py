"""The names of everything sd-rest keeps in Redis: one place, so the API node and the worker
hosts cannot disagree. Everything is under `sd-rest:` (Dramatiq's own keys under
`sd-rest-queue:`); one API node per Redis database."""

from __future__ import annotations

import re
from typing import Final

PREFIX: Final = "sd-rest"
DRAMATIQ_NAMESPACE: Final = "sd-rest-queue"
ACTOR: Final = "sd_rest_job"  # the one Dramatiq actor: run a job
GROUP: Final = "api"  # the API node's consumer group on every job stream
CANCEL_CHANNEL: Final = f"{PREFIX}:cancel"  # PUBLISH "<endpoint>:<id>"
WORKERS: Final = f"{PREFIX}:workers"  # a set of worker ids; each one's record below
MAX_DEATHS: Final = 3  # deliveries of one job whose worker died before it is FAILED
# A stream the API node reads with the job streams (group GROUP): the fence's START adds
# `job <stream>` to it when a worker starts a job (the API node reads only the streams of
# started jobs), and the API node adds `wake 1` to end its own blocked read at once.
NOTIFY: Final = f"{PREFIX}:api-notify"
NOTIFY_MAXLEN: Final = 10_000  # about; a notice lost past it is found again at a restart

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


# Dramatiq's Redis broker's own names (dramatiq/brokers/redis.py and its dispatch.lua): its
# hosts' last heartbeats (a sorted set), and per queue a list of message ids with a hash of
# their bodies.
DRAMATIQ_HEARTBEATS: Final = f"{DRAMATIQ_NAMESPACE}:__heartbeats__"


def dramatiq_queue(queue: str) -> tuple[str, str]:
    """Dramatiq's list of a queue's message ids, and its hash of their bodies."""
    name = f"{DRAMATIQ_NAMESPACE}:{queue}"
    return name, f"{name}.msgs"


def job(endpoint: str, id_: str) -> str:
    """A job's hash: its queue, `made` (images sent so far), the current `attempt` and its
    `worker`, `deliveries`, `canceled`, `enqueued` and Dramatiq's `message` id."""
    return f"{PREFIX}:job:{endpoint}:{id_}"


def stream(endpoint: str, id_: str) -> str:
    """A job's report stream: started, progress, image, end (entries.py)."""
    return f"{PREFIX}:stream:{endpoint}:{id_}"


def worker(worker_id: str) -> str:
    """A worker's record (JSON), kept alive by its heartbeat (expires after the timeout)."""
    return f"{PREFIX}:worker:{worker_id}"


def queue_for(name: str, sha256: str | None) -> str:
    """The Dramatiq queue of the jobs that need a checkpoint: by its SHA-256 when the API node
    knows it (it has the file), else by its file name."""
    if sha256:
        return f"sha-{sha256[:32]}"
    return f"name-{_SAFE.sub('_', name)[:100]}"
