"""`worker --check`: what a worker host needs, one line each, in the server's --check words
(setup/check.py) for the repository, the interpreter and the checkpoints, plus the broker:
Redis reachable, and the password accepted."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sd_rest.cluster.broker import probe, redact
from sd_rest.endpoints import INPAINT_IMAGE, TEXT_TO_IMAGE
from sd_rest.setup import check as checks

PING_TIMEOUT = 5.0  # seconds to connect to Redis and to hear its answer


@dataclass(frozen=True)
class WorkerTarget:
    broker: str
    repository: Path
    python: Path
    python_explicit: bool
    text_to_image_model: Path
    inpaint_image_model: Path
    demo: bool  # the simulator and its placeholder checkpoints: only their presence counts


def ping(url: str) -> str | None:
    """None when Redis answers at `url` and takes its password; else one line saying what to
    fix."""
    return probe(url, PING_TIMEOUT)


def broker(url: str) -> checks.Result:
    problem = ping(url)
    if problem is not None:
        return checks.Result("broker", checks.FAIL, problem)
    return checks.Result("broker", checks.OK, f"Redis at {redact(url)} answers")


def _checkpoint(path: Path, model: str, demo: bool) -> checks.Result:
    if demo and path.is_file():  # the simulator's placeholders are no real checkpoints
        return checks.Result(f"{model} model", checks.OK, f"{path} (demo placeholder)")
    return checks.checkpoint(path, model)


def run_all(target: WorkerTarget) -> Iterable[checks.Result]:
    """Every check, in the order a user fixes things."""
    yield broker(target.broker)
    repo = checks.repository(target.repository)
    yield repo
    if repo.failed:
        yield checks.Result("scripts", checks.SKIP, "needs the repository")
    else:
        yield checks.scripts(target.repository)
    python = checks.interpreter(target.python, target.python_explicit)
    if not python.failed:
        python = checks.interpreter_runs(target.python)
    yield python
    if not repo.failed and not python.failed and not target.demo:
        yield from checks.imports(target.python, target.repository)
    models = [
        _checkpoint(target.text_to_image_model, TEXT_TO_IMAGE, target.demo),
        _checkpoint(target.inpaint_image_model, INPAINT_IMAGE, target.demo),
    ]
    if all(model.failed for model in models):
        yield from models
        return
    # One checkpoint is enough for a worker: the other's jobs go to hosts that hold it.
    for model in models:
        if model.failed:
            yield checks.Result(model.item, checks.WARN, model.detail, model.fix)
        else:
            yield model
