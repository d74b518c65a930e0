"""The snapshots of event streams, as parts that every client shares.

A snapshot of every job is one event, `{"jobs": [item, …]}`, and an item carries the job's
parameters: with a queue of long prompts it is hundreds of kilobytes. Built for each client, a
few hundred clients that do not read would hold a copy each. So each job's item is serialised
in two parts, around its queue position (which moves for every waiting job whenever one ahead
leaves), and the parts are kept and shared: a client's snapshot is a list of references to
them, written out as its connection takes it (subscriber.py). The bytes are exactly those of
`dumps(job_item(job, position))`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from sd_rest.state.items import dumps, item_head, item_tail
from sd_rest.state.jobs import Job
from sd_rest.state.layout import Key

_SNAPSHOT_OPEN: bytes = b'{"jobs":['
_SNAPSHOT_CLOSE: bytes = b"]}"
_END: bytes = b"\r\n\r\n"


def item_parts(job: Job) -> tuple[bytes, bytes]:
    """(head, tail): the job's item up to where `position` goes, and from there on."""
    head, tail = dumps(item_head(job)), dumps(item_tail(job))
    return head[:-1].encode(), b"," + tail[1:].encode()


@functools.lru_cache(maxsize=4096)
def position_part(position: int | None) -> bytes:
    """`position` as the status document carries it (last of its keys); b"" for none."""
    return b"" if position is None else b',"position":%d' % position


def event_head(event_id: int, name: str) -> bytes:
    """A frame (streams.frame) up to its data."""
    return f"id: {event_id}\r\nevent: {name}\r\ndata: ".encode()


class ItemParts:
    """The parts of each unfinished job's item, kept while they stay the same."""

    def __init__(self) -> None:
        self._parts: dict[Key, tuple[int, bytes, bytes]] = {}  # version, head, tail

    def parts(self, job: Job, position: int | None) -> list[bytes]:
        key = (job.endpoint, job.id)
        kept = self._parts.get(key)
        if kept is not None and kept[0] == job.version:
            _, head, tail = kept
        else:
            head, tail = item_parts(job)
            if kept is not None:
                # A move changes the version, not the item: keep the parts clients share.
                head = kept[1] if kept[1] == head else head
                tail = kept[2] if kept[2] == tail else tail
            self._parts[key] = (job.version, head, tail)
        return [head, position_part(position), tail]

    def forget(self, key: Key) -> None:
        self._parts.pop(key, None)

    def keep_only(self, keys: Iterable[Key]) -> None:
        wanted = set(keys)
        for key in [key for key in self._parts if key not in wanted]:
            del self._parts[key]

    def __len__(self) -> int:
        return len(self._parts)


def job_snapshot(event_id: int, name: str, parts: list[bytes]) -> list[bytes]:
    """The frame of one job's item (a job's `snapshot`, or its final event)."""
    return [event_head(event_id, name), *parts, _END]


def every_job_snapshot(event_id: int, items: list[list[bytes]]) -> list[bytes]:
    """The frame of `/events`' snapshot: `{"jobs": [items]}`."""
    out = [event_head(event_id, "snapshot"), _SNAPSHOT_OPEN]
    for n, parts in enumerate(items):
        if n:
            out.append(b",")
        out += parts
    out += [_SNAPSHOT_CLOSE, _END]
    return out
