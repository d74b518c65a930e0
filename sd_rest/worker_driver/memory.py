"""Giving memory back after each job, and measuring it."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import Any

FULL_COLLECT_EVERY = 20  # jobs
# Seconds a heartbeat's RSS may be old between jobs: on macOS each measurement runs `ps` (no
# /proc), forked from a process that may hold gigabytes, and the figure is only for `GET /`.
RSS_EVERY = 60.0

_jobs_since_full_collection = 0


def collect_garbage(full: bool = False) -> None:
    """gc.collect() after each job, cheaply. A plain collection walks every object torch,
    transformers and the model made (0.2 s a job on the kit); gc.freeze() moves the survivors out
    of the collector's sight, so later collections only walk what the last job made. Frozen
    objects are still freed by reference counting; cycles among them (an evicted model's, say)
    wait for the full collection done on eviction and every FULL_COLLECT_EVERY jobs."""
    global _jobs_since_full_collection
    _jobs_since_full_collection += 1
    if full or _jobs_since_full_collection >= FULL_COLLECT_EVERY:
        gc.unfreeze()
        _jobs_since_full_collection = 0
    gc.collect()
    gc.freeze()


def release_device_memory() -> None:
    """Empty torch's device caches and give freed heap back, so RSS shows what is alive (and
    unified memory on a Mac goes back to the system)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        _empty_torch_caches(torch)
    if sys.platform.startswith("linux"):
        try:  # glibc keeps freed heap pages
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except Exception:
            pass


def _empty_torch_caches(torch: Any) -> None:
    # Each guarded on its own: a torch without cuda or mps (or a stand-in) has neither.
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        pass
    try:
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "empty_cache") and torch.backends.mps.is_available():
            mps.empty_cache()
    except Exception:
        pass


def resident_set_size() -> int | None:
    """This process's RSS in bytes: /proc on Linux, ps on macOS."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import subprocess

        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True
        )
        return int(out.stdout.strip()) * 1024
    except (OSError, ValueError):
        return None


class LastRss:
    """The last RSS measured (after each job), shared by the threads that send it: the
    heartbeats reuse it, measuring again once it is RSS_EVERY seconds old."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: int | None = None
        self._measured = float("-inf")

    def measure(self) -> int | None:
        value = resident_set_size()
        with self._lock:
            self._value, self._measured = value, time.monotonic()
        return value

    def recent(self) -> int | None:
        with self._lock:
            if time.monotonic() - self._measured < RSS_EVERY:
                return self._value
        return self.measure()


RSS = LastRss()
