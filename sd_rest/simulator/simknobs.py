"""The simulator's knobs and event log, shared by its scripts and its stand-in packages.

Knobs are environment variables the real scripts ignore (README.md lists them). They are read
when they are used, not once at import, so that a long-lived interpreter that runs the scripts
again and again (sd-rest's resident worker) follows the environment of each run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knobs:
    """Test and benchmark controls, all optional environment variables."""

    import_seconds: float = 0.0  # importing the libraries: once per interpreter
    safety_seconds: float = 0.0  # txt2img's safety checker and feature extractor: once
    load_seconds: float = 0.3  # each torch.load of a checkpoint, before the file is opened
    build_seconds: float = 0.0  # each construction of a model (its random initialisation)
    step_seconds: float = 0.02
    fail_at_step: int | None = None
    exit_at_step: tuple[int, int] | None = None  # (step, status): a silent exit
    kill_at_step: int | None = None  # SIGKILL to itself, as an out-of-memory killer does
    write_seconds: float = 0.0
    png_bytes: int = 0  # each PNG padded to at least this size (a private chunk): transport tests
    argv_log: str | None = None
    event_log: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Knobs:
        fail = environ.get("SD_SIM_FAIL_AT_STEP", "").strip()
        exit_at = environ.get("SD_SIM_EXIT_AT_STEP", "").strip()
        kill = environ.get("SD_SIM_KILL_AT_STEP", "").strip()
        step, _, status = exit_at.partition(":")

        def seconds(name: str, default: float) -> float:
            return float(environ.get(name, default))

        return cls(
            import_seconds=seconds("SD_SIM_IMPORT_SECONDS", cls.import_seconds),
            safety_seconds=seconds("SD_SIM_SAFETY_SECONDS", cls.safety_seconds),
            load_seconds=seconds("SD_SIM_LOAD_SECONDS", cls.load_seconds),
            build_seconds=seconds("SD_SIM_BUILD_SECONDS", cls.build_seconds),
            step_seconds=seconds("SD_SIM_STEP_SECONDS", cls.step_seconds),
            fail_at_step=int(fail) if fail else None,
            exit_at_step=(int(step), int(status or 3)) if exit_at else None,
            kill_at_step=int(kill) if kill else None,
            write_seconds=seconds("SD_SIM_WRITE_SECONDS", cls.write_seconds),
            png_bytes=int(environ.get("SD_SIM_PNG_BYTES", "0") or 0),
            argv_log=environ.get("SD_SIM_ARGV_LOG") or None,
            event_log=environ.get("SD_SIM_EVENT_LOG") or None,
        )


def knobs() -> Knobs:
    """The knobs as the environment sets them now."""
    return Knobs.from_env(os.environ)


def append_json_line(path: str, record: Mapping[str, Any]) -> None:
    # One write per record in append mode, so concurrent runs do not interleave lines.
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def event(name: str, **fields: Any) -> None:
    """Append `{"t", "event": name, "pid", **fields}` to SD_SIM_EVENT_LOG, when it is set. The
    pid tells runs in one long-lived interpreter from runs in fresh processes."""
    path = knobs().event_log
    if path:
        append_json_line(path, {"t": time.time(), "event": name, "pid": os.getpid(), **fields})
