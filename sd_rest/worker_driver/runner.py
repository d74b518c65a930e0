"""One job: a script run as ``__main__`` with the job's argv, ended the way a run by hand ends.

Before and after each run the driver puts back what a script may change in the interpreter
(argv, sys.path, cwd, os.environ, warnings, stdout/stderr, the SIGINT handler, torch's global
settings), so every run starts from the same state. Exit status and the traceback text are those
of a run by hand: the driver's and runpy's frames are trimmed from tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict

from .caches import CACHES
from .channel import capped
from .memory import collect_garbage, release_device_memory

Send = Callable[[Dict[str, Any]], None]


class WorkerState:
    """What "status" reports, and whether a script is running (for the SIGINT handler)."""

    def __init__(self) -> None:
        self.in_script = False
        self.busy = False
        self.job: Any = None
        self.jobs = 0
        self.started = time.time()
        self.base_path: list[str] = []  # sys.path at start, without the driver's folder


STATE = WorkerState()


def on_sigint(signum: int, frame: Any) -> None:
    """The default handler's behaviour, but only while a script runs: an interrupt that arrives
    after the script ended (the server's cancel racing with the job's end) must not hit the
    driver's own bookkeeping."""
    if STATE.in_script:
        raise KeyboardInterrupt


# torch's process-wide settings a script may change: (getter, setter).
_TORCH_SETTINGS = (
    ("is_grad_enabled", "set_grad_enabled"),
    ("get_default_dtype", "set_default_dtype"),
    ("get_num_threads", "set_num_threads"),
)


def _torch_settings(torch: Any) -> dict[str, Any]:
    """The settings this torch has (a stand-in may have none), by setter name."""
    return {
        setter: getattr(torch, getter)()
        for getter, setter in _TORCH_SETTINGS
        if hasattr(torch, getter) and hasattr(torch, setter)
    }


def _fresh_torch_settings(torch: Any) -> dict[str, Any]:
    """What a freshly imported torch has (for a run that imported torch first)."""
    fresh = {"set_grad_enabled": True, "set_default_dtype": getattr(torch, "float32", None)}
    return {k: v for k, v in fresh.items() if v is not None and k in _torch_settings(torch)}


class RunState:
    """What a script run may change in the interpreter, taken before and put back after."""

    def __init__(self) -> None:
        self.argv = list(sys.argv)
        self.path = list(sys.path)
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        self.filters = list(warnings.filters)
        self.showwarning = warnings.showwarning
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.sigint = signal.getsignal(signal.SIGINT)
        torch = sys.modules.get("torch")
        self.torch = _torch_settings(torch) if torch is not None else None

    def restore(self) -> None:
        sys.argv[:] = self.argv
        sys.path[:] = self.path
        with contextlib.suppress(OSError):
            os.chdir(self.cwd)
        self._restore_environ()
        warnings.filters[:] = self.filters
        warnings.showwarning = self.showwarning
        _reset_warning_registries()
        sys.stdout, sys.stderr = self.stdout, self.stderr
        signal.signal(signal.SIGINT, self.sigint)
        torch = sys.modules.get("torch")
        if torch is not None:
            self._restore_torch(torch)

    def _restore_environ(self) -> None:
        for name in [name for name in os.environ if name not in self.environ]:
            del os.environ[name]
        for name, value in self.environ.items():
            if os.environ.get(name) != value:
                os.environ[name] = value

    def _restore_torch(self, torch: Any) -> None:
        wanted = self.torch if self.torch is not None else _fresh_torch_settings(torch)
        now = _torch_settings(torch)
        for setter, value in wanted.items():
            if now.get(setter) != value:
                getattr(torch, setter)(value)


def _reset_warning_registries() -> None:
    """A run by hand shows each 'default'/'once' warning again; so should the next job's log."""
    mutated = getattr(warnings, "_filters_mutated", None) or getattr(
        warnings, "_filters_mutated_lock_held", None
    )
    if mutated is not None:
        with contextlib.suppress(Exception):
            mutated()


class Ending:
    """How a run ended, as "finished" reports it."""

    def __init__(
        self,
        outcome: str = "ok",
        exit_code: int = 0,
        error: str | None = None,
        oom: bool = False,
        recycle: str | None = None,
    ) -> None:
        self.outcome = outcome
        self.exit_code = exit_code
        self.error = error
        self.oom = oom
        self.recycle = recycle  # why the server should replace this worker, if it should

    @classmethod
    def interrupted(cls, recycle: str | None = None) -> Ending:
        return cls("interrupted", -int(signal.SIGINT), "interrupted", recycle=recycle)


_DRIVER_FOLDER = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _script_frames(tb: Any, script: str) -> Any:
    """The traceback from the script's first frame on (no runpy or driver frames above it)."""
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    return tb


def _drop_driver_frames(exception: Any, seen: set[int]) -> None:
    """Remove the driver's own frames (its wrappers around torch.load, instantiate_from_config,
    ..., its SIGINT handler) from a TracebackException and the exceptions chained to it."""
    if exception is None or id(exception) in seen:
        return
    seen.add(id(exception))
    frames = [f for f in exception.stack if not f.filename.startswith(_DRIVER_FOLDER)]
    exception.stack = traceback.StackSummary.from_list(frames)
    _drop_driver_frames(exception.__cause__, seen)
    _drop_driver_frames(exception.__context__, seen)


def _print_exception(exc: BaseException, script: str) -> None:
    """The traceback as Python prints it for `python script.py`."""
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(Exception):
            stream.flush()
    stream = sys.__stderr__ if sys.stderr is None else sys.stderr
    printed = traceback.TracebackException(
        type(exc), exc, _script_frames(exc.__traceback__, script)
    )
    _drop_driver_frames(printed, set())
    stream.write("".join(printed.format()))


def _through_import(tb: Any) -> bool:
    """Did the exception pass through the import machinery itself? (Frames of a module being
    executed are trimmed from tracebacks, those of importlib's own work are not.)"""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        tb = tb.tb_next
    return False


def half_imported() -> set[str]:
    """Modules whose parent package is not imported: what a package whose __init__ failed
    after importing some of its submodules leaves behind (Python drops the package, keeps the
    submodules)."""
    names = set(sys.modules)
    return {name for name in names if "." in name and name.rpartition(".")[0] not in names}


def _import_damage(tb: Any, half_imported_before: set[str]) -> bool:
    """May the run have left a package half imported? Then the worker is not worth trusting
    for the next job."""
    return _through_import(tb) or bool(half_imported() - half_imported_before)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _ending_of_exit(exc: SystemExit) -> Ending:
    code = exc.code
    if code is None:
        return Ending()
    if not isinstance(code, int):
        print(code, file=sys.stderr)  # as the interpreter does for sys.exit("text")
        return Ending("error", 1, "exit code 1")
    if code == 0:
        return Ending()
    return Ending("error", code, f"exit code {code}")


def _ending_of_exception(exc: BaseException, script: str, half_before: set[str]) -> Ending:
    _print_exception(exc, script)
    error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    if _is_oom(exc):
        return Ending("error", 1, error, oom=True, recycle="out of memory")
    damaged = _import_damage(exc.__traceback__, half_before)
    return Ending("error", 1, error, recycle="failed during an import" if damaged else None)


def _seed_torch(seed: Any) -> None:
    """What the server's sitecustomize does at interpreter start for a run by hand: seed torch
    if it imports. It cannot: the script goes on anyway (Python's site.py prints a failing
    sitecustomize's error and goes on), and its own `import torch` fails as by hand."""
    try:
        import torch
    except ImportError:
        return
    except Exception as exc:
        print(f"sd-rest: could not import torch to seed it: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip
        return
    torch.manual_seed(int(seed))


def _run_script(script: str, seed: Any = None) -> Ending:
    """runpy the script as __main__ (torch seeded first when `seed` is given); SIGINT
    interrupts it, and the seeding's import of torch, only while they run."""
    half_before = half_imported()  # before the seeding: its import of torch may break too
    try:
        STATE.in_script = True  # from the seeding on: a cancel may come during its import
        try:
            if seed is not None:
                _seed_torch(seed)
            runpy.run_path(script, run_name="__main__")
        finally:
            STATE.in_script = False
    except SystemExit as exc:
        return _ending_of_exit(exc)
    except KeyboardInterrupt as exc:
        _print_exception(exc, script)
        damaged = _import_damage(exc.__traceback__, half_before)
        return Ending.interrupted("interrupted during an import" if damaged else None)
    except BaseException as exc:  # everything a script can raise
        return _ending_of_exception(exc, script, half_before)
    return Ending()


def _close_leftover_bars() -> None:
    """A script that raised leaves its tqdm bars open (its frames hold them). A run by hand
    closes them at interpreter exit; do it now so their last output belongs to this job and the
    next job's bars start at position 0 again."""
    tqdm_module = sys.modules.get("tqdm")
    instances = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
    if not instances:
        return
    for bar in sorted(instances, key=lambda b: -getattr(b, "pos", 0)):
        with contextlib.suppress(Exception):
            bar.close()


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _missing_script(job_id: Any, script: str, marker: Any, send: Send) -> None:
    """What `python missing.py` does: one line on stderr, exit status 2."""
    send({"event": "started", "job": job_id})
    print(f"{sys.executable}: can't open file {script!r}: [Errno 2] No such file or directory",
          file=sys.stderr)  # fmt: skip
    _flush_output()
    if marker:
        os.write(1, str(marker).encode())
    send({
        "event": "finished", "job": job_id, "outcome": "error", "exit_code": 2,
        "error": capped(f"no such script: {script}"), "oom": False, "recycle": None, "seconds": 0.0,
        "cache": None,
    })  # fmt: skip


def run_job(message: dict[str, Any], send: Send) -> None:
    """Run one "run" message: "started", the script, clean-up, the marker, "finished"."""
    job_id = message.get("job")
    script = message["script"]
    if not os.path.isfile(script):
        _missing_script(job_id, script, message.get("marker"), send)
        return
    saved = RunState()
    STATE.busy, STATE.job = True, job_id
    cache = CACHES.start_job()
    ending = Ending()
    started = time.perf_counter()
    send({"event": "started", "job": job_id})
    try:
        os.chdir(message.get("cwd") or os.getcwd())
        sys.argv[:] = [script] + [str(a) for a in message.get("argv", [])]
        # `python scripts/x.py` puts the script's folder first on sys.path
        sys.path[:] = [os.path.dirname(os.path.abspath(script)), *STATE.base_path]
        ending = _run_script(script, message.get("seed"))
    except KeyboardInterrupt:  # landed in the set-up above, outside the script
        ending = Ending.interrupted()
    finally:
        STATE.in_script = False
        _end_run(ending, saved, message.get("marker"))
    send({
        "event": "finished", "job": job_id, "outcome": ending.outcome,
        "exit_code": ending.exit_code, "error": capped(ending.error), "oom": ending.oom,
        "recycle": ending.recycle, "seconds": round(time.perf_counter() - started, 3),
        "cache": cache.report(),
    })  # fmt: skip


def _end_run(ending: Ending, saved: RunState, marker: Any) -> None:
    """Leave the worker idle and consistent: what a run by hand's exit would do, the cached
    model repaired, the interpreter's state put back, memory released; then the marker."""
    _close_leftover_bars()
    _flush_output()
    CACHES.end_job(ending.outcome == "ok")
    saved.restore()
    collect_garbage()
    release_device_memory()
    if marker:
        os.write(1, str(marker).encode())
    STATE.busy, STATE.job = False, None
    STATE.jobs += 1
