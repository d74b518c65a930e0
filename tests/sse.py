"""A blocking text/event-stream client for the tests: one real HTTPS connection, its events
parsed as a browser's EventSource parses them (id, event, data, retry, comments)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from helpers import Server


@dataclass
class Event:
    id: str | None
    event: str
    data: Any  # the JSON in `data:`, parsed
    retry: int | None = None
    comment: str | None = None  # a line starting with ":" (not an event for EventSource)

    @property
    def number(self) -> int:
        assert self.id is not None
        return int(self.id)


class EventStream:
    def __init__(
        self,
        server: Server,
        path: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.conn = http.client.HTTPSConnection(
            "localhost", server.port, context=server.context(), timeout=timeout
        )
        self.conn.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k: v for k, v in self.response.getheaders()}
        self.ended = False
        self.retry: int | None = None
        if self.status != 200:
            self.body = self.response.read()
            self.ended = True

    def json(self) -> Any:
        return json.loads(self.body)

    def _lines(self) -> Iterator[str]:
        while True:
            raw = self.response.readline()
            if not raw:
                self.ended = True
                return
            yield raw.decode().rstrip("\r\n")

    def items(self) -> Iterator[Event]:
        """Events and comments as they arrive, until the server ends the stream."""
        fields: dict[str, str] = {}
        data: list[str] = []
        for line in self._lines():
            if line == "":
                if "retry" in fields:
                    self.retry = int(fields["retry"])
                if data:
                    parsed = json.loads("\n".join(data))
                    retry = int(fields["retry"]) if "retry" in fields else None
                    yield Event(fields.get("id"), fields.get("event", "message"), parsed, retry)
                elif "retry" in fields:
                    yield Event(None, "retry", None, int(fields["retry"]))
                fields, data = {}, []
            elif line.startswith(":"):
                yield Event(None, "comment", None, comment=line[1:].strip())
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data":
                    data.append(value)
                else:
                    fields[name] = value

    def events(self) -> Iterator[Event]:
        """Only the events EventSource would dispatch (no comments, no bare retry)."""
        return (e for e in self.items() if e.event not in ("comment", "retry"))

    def until(self, done: Callable[[Event], bool], timeout: float = 30.0) -> list[Event]:
        """Events up to and including the first for which `done` is true."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        for event in self.events():
            seen.append(event)
            if done(event):
                return seen
            assert time.monotonic() < deadline, f"no end within {timeout} s: {seen[-5:]}"
        raise AssertionError(f"the stream ended first: {seen[-5:]}")

    def rest(self) -> list[Event]:
        """Every event until the server ends the stream."""
        return list(self.events())

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def job_events(events: list[Event], job_id: str) -> list[Event]:
    return [e for e in events if isinstance(e.data, dict) and e.data.get("id") == job_id]


def names(events: list[Event]) -> list[str]:
    return [e.event for e in events]


FINAL = ("complete", "failed", "canceled")
