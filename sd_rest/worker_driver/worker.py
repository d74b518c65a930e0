"""Start-up and the main loop: connect, say "ready", then serve the channel's messages.

The main thread runs jobs (and "check", "exit") one at a time from a queue; a reader thread
reads the socket, answers "status" at once (even mid-job), starts "prepare" in the background,
and ends the process when the server's end closes; a heartbeat thread sends the status every
few seconds, whatever the script does, so that the server can tell a worker that is alive from
one that was stopped or hangs holding the interpreter lock (a thread of its own: a script's long
C call may hold the GIL, but the interpreter still switches to the heartbeat between calls; a
stopped process sends nothing). A script deadlocked in a wait that releases the lock (a lock, a
queue, a read) leaves the heartbeat beating: that hang is not seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn

from . import HEARTBEAT_ENV, SOCKET_ENV, TOKEN_ENV, VERSION, hooks
from .caches import CACHES, check_resident, resident_summary
from .channel import Channel, capped
from .generator import state_bytes
from .memory import RSS, resident_set_size
from .runner import STATE, on_sigint, run_job

EXIT_USAGE = 2  # no socket to connect to
EXIT_DRIVER_FAILED = 70  # EX_SOFTWARE: the driver itself failed ("fatal")
DEFAULT_HEARTBEAT = 2.0  # seconds between heartbeats when the server does not say


def status(event: str, rss: int | None) -> dict[str, Any]:
    return {
        "event": event, "pid": os.getpid(), "rss": rss, "busy": STATE.busy,
        "job": STATE.job, "jobs": STATE.jobs, "models": resident_summary(),
        "uptime": round(time.time() - STATE.started, 1),
    }  # fmt: skip


def _heartbeat_interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        return DEFAULT_HEARTBEAT
    return seconds if 0.01 <= seconds <= 3600 else DEFAULT_HEARTBEAT


def _beat(channel: Channel, interval: float) -> None:
    """The heartbeat thread: the status, every `interval` seconds, until the channel breaks
    (the reader thread then ends the process). Its RSS is the last measured (memory.RSS_EVERY)."""
    while True:
        try:
            channel.send(status("heartbeat", RSS.recent()))
        except OSError:
            return
        except Exception:
            pass  # a status that cannot be read this time: the next beat tries again
        time.sleep(interval)


def check() -> dict[str, Any]:
    try:
        ok, detail = check_resident()
    except Exception as exc:
        ok, detail = False, repr(exc)
    return {"event": "check", "ok": ok, "detail": detail}


def prepare(message: dict[str, Any]) -> None:
    """Background: the end state of a build for the seed of a job expected next."""
    try:
        res = CACHES.resident
        torch = sys.modules.get("torch")
        if res is None or torch is None or message.get("seed") is None:
            return
        if res.plan.mode not in ("jump", "replay"):
            return  # nothing to compute ahead: rebuild builds, same-seed is free
        generator = torch.Generator(device="cpu").manual_seed(int(message["seed"]))
        res.plan.prepare(state_bytes(generator.get_state()))
    except Exception:
        pass  # a hint only: the job computes what it needs anyway


def _leave(status: int) -> NoReturn:
    """os._exit: no interpreter teardown, which can be slow and has nothing to save. But for
    coverage.py, when a test run measures this process: atexit would have saved its data."""
    coverage = sys.modules.get("coverage")
    measuring = getattr(getattr(coverage, "Coverage", None), "current", lambda: None)()
    if measuring is not None:
        with contextlib.suppress(Exception):
            measuring.stop()
            measuring.save()
    os._exit(status)


def _read(channel: Channel, enqueue: Callable[[dict[str, Any]], None]) -> None:
    """The reader thread."""
    try:
        for line in channel.lines():
            _dispatch(line, channel, enqueue)
    except Exception:
        pass
    # EOF (or a broken socket): the server is gone. Leave at once, mid-job or not, so that no
    # worker outlives its server.
    _leave(0)


def _dispatch(line: bytes, channel: Channel, enqueue: Callable[[dict[str, Any]], None]) -> None:
    try:
        message = json.loads(line)
        op = message.get("op")
    except Exception as exc:
        channel.send({"event": "error", "error": f"bad message: {exc}"})
        return
    if op == "status":
        channel.send(status("status", resident_set_size()))  # asked for: measured now
    elif op == "prepare":
        threading.Thread(target=prepare, args=(message,), daemon=True).start()
    elif op in ("run", "exit", "check"):
        enqueue(message)
    else:
        channel.send({"event": "error", "error": f"unknown op {op!r}"})


def _serve(channel: Channel, work: queue.Queue[dict[str, Any]]) -> None:
    """The main thread: one queued message at a time, until "exit"."""
    while True:
        message = work.get()
        op = message.get("op")
        if op == "exit":
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            _leave(0)
        elif op == "check":
            channel.send(check())
        elif op == "run":
            _run(channel, message)


def _run(channel: Channel, message: dict[str, Any]) -> None:
    try:
        run_job(message, channel.send)
    except KeyboardInterrupt:  # landed in the driver between runs: nothing to undo
        pass
    except Exception as exc:
        # A failure of the driver itself (not of a script): its state cannot be trusted. Say
        # so and leave; the server replaces the worker (and retries the job).
        traceback.print_exc()
        try:
            channel.send({"event": "fatal", "job": message.get("job"), "error": capped(repr(exc))})
        finally:
            _leave(EXIT_DRIVER_FAILED)
    _after_job(channel)


def _after_job(channel: Channel) -> None:
    """What the job left resident (its RSS measured afresh), without waiting a beat. A status
    that cannot be read is no failure of the job's or the driver's (the next beat tries again);
    a broken channel is the reader thread's to see."""
    with contextlib.suppress(Exception):
        channel.send(status("heartbeat", RSS.measure()))


def main() -> int:
    # Taken out of the environment first: the scripts must see what a run by hand sees.
    path = os.environ.pop(SOCKET_ENV, "")
    token = os.environ.pop(TOKEN_ENV, "")
    interval = _heartbeat_interval(os.environ.pop(HEARTBEAT_ENV, ""))
    if not path:
        print(f"worker_driver: {SOCKET_ENV} is not set", file=sys.stderr)
        return EXIT_USAGE
    try:
        channel = Channel.connect(path)
    except OSError as exc:
        print(f"worker_driver: cannot connect to {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    STATE.base_path = list(sys.path)
    hooks.install()
    signal.signal(signal.SIGINT, on_sigint)
    work: queue.Queue[dict[str, Any]] = queue.Queue()
    reader = threading.Thread(
        target=_read, args=(channel, work.put), name="sd-rest-reader", daemon=True
    )
    reader.start()
    channel.send({
        "event": "ready", "pid": os.getpid(), "python": ".".join(map(str, sys.version_info[:3])),
        "driver": VERSION, "token": token,
    })  # fmt: skip
    threading.Thread(
        target=_beat, args=(channel, interval), name="sd-rest-heartbeat", daemon=True
    ).start()
    _serve(channel, work)
    return 0
