"""A worker host fetches no more jobs than it can start at once.

Dramatiq gives each queue a consumer of its own, each prefetching up to `--concurrency`
messages: a host with --concurrency 1 holding two checkpoints consumes four queues, and while
it runs one job its other consumers would fetch up to three more, to wait here while another
host sits idle (and a message fetched here is this host's until it dies). So the consumers
share the host's slots: a consumer fetches only as many messages as there are free slots, a
fetched message holds its slot until it is acknowledged (or given back), and while every slot
is taken no consumer fetches at all, the delay queues' included (they would only move
messages, but a host that is full has nothing to do with Redis).

A consumer that finds the host full waits in `do_fetch` for a slot (at most its timeout, the
Worker's worker_timeout) and fetches the moment one is free. Returning nothing at once instead
would count as an empty queue: Dramatiq's consumer backs off longer after each (up to the same
timeout), so a host that has been busy for a while would take its next job up to a timeout
late. Dramatiq records a host's
heartbeat only when it fetches: the registry's heartbeat thread records it instead
(heartbeat.py), so a full host is not taken for a dead one.

The gate sits between Dramatiq's own consumer and the broker it calls (`do_fetch`, `do_ack`,
`do_nack`, `do_requeue`, the Redis broker's Lua commands), so none of Dramatiq's code is
replaced: the consumers' prefetch, backoff and acknowledgements stay its own.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dramatiq.broker import Consumer
    from dramatiq.brokers.redis import RedisBroker


class Slots:
    """The host's free slots: `--concurrency` of them, one per job fetched and not yet done."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._changed = threading.Condition()

    def take(self, wanted: int, wait: float = 0.0) -> int:
        """As many as are free, up to `wanted`, waiting up to `wait` seconds for one to be
        free (none taken when none is by then)."""
        with self._changed:
            self._changed.wait_for(lambda: self._free > 0, wait)
            taken = max(0, min(wanted, self._free))
            self._free -= taken
            return taken

    def wait_free(self, wait: float) -> bool:
        """Whether a slot is free, waiting up to `wait` seconds for one."""
        with self._changed:
            return self._changed.wait_for(lambda: self._free > 0, wait)

    def give_back(self, count: int) -> None:
        if count <= 0:
            return
        with self._changed:
            self._free += count
            self._changed.notify_all()

    @property
    def free(self) -> int:
        with self._changed:
            return self._free


class GatedBroker:
    """The broker as one consumer sees it: fetching within the host's free slots. A delay
    queue's consumer (`delay`) takes no slot (what it fetches goes back to a queue, to be
    fetched again), but fetches nothing while the host is full either."""

    def __init__(self, broker: RedisBroker, slots: Slots, delay: bool, wait: float) -> None:
        self._broker = broker
        self._slots = slots
        self._delay = delay
        self._wait = wait  # seconds a fetch waits for a free slot: the consumer's timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def do_fetch(self, queue_name: str, wanted: int) -> list[bytes]:
        if self._delay:
            full = not self._slots.wait_free(self._wait)
            return [] if full else self._broker.do_fetch(queue_name, wanted)
        taken = self._slots.take(wanted, self._wait)
        if taken == 0:
            return []  # still full: the consumer asks again
        try:
            fetched = self._broker.do_fetch(queue_name, taken)
        except BaseException:
            self._slots.give_back(taken)
            raise
        self._slots.give_back(taken - len(fetched))
        return fetched

    def do_ack(self, queue_name: str, *message_ids: str) -> Any:
        return self._settle("ack", queue_name, message_ids)

    def do_nack(self, queue_name: str, *message_ids: str) -> Any:
        return self._settle("nack", queue_name, message_ids)

    def do_requeue(self, queue_name: str, *message_ids: str) -> Any:
        try:
            return self._broker.do_requeue(queue_name, *message_ids)
        finally:  # given back or not (the host is stopping), they are not run here
            self._give_back(len(message_ids))

    def _settle(self, command: str, queue_name: str, message_ids: tuple[str, ...]) -> Any:
        import redis

        try:
            result = getattr(self._broker, f"do_{command}")(queue_name, *message_ids)
        except redis.ConnectionError:
            raise  # Dramatiq tries again until Redis answers: the slot stays taken till then
        except BaseException:
            self._give_back(len(message_ids))  # Dramatiq gives up on it: so does the slot
            raise
        self._give_back(len(message_ids))
        return result

    def _give_back(self, count: int) -> None:
        if not self._delay:
            self._slots.give_back(count)


def gate(broker: RedisBroker, slots: Slots) -> None:
    """Every consumer `broker` makes from now on fetches within `slots`. (The broker is made
    in cluster/broker.py for both halves; only the worker host narrows its consumers.)"""
    from dramatiq.common import q_name

    make = broker.consumer_class

    def consume(queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        delay = q_name(queue_name) != queue_name
        gated = GatedBroker(broker, slots, delay, wait=timeout / 1000)
        return make(gated, queue_name, prefetch, timeout)  # type: ignore[call-arg]

    broker.consume = consume  # type: ignore[method-assign]
