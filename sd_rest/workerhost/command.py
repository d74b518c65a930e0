"""`stable-diffusion-rest-api worker --broker URL ...`: the worker host's command line. Every
start-up problem (the cluster extra missing, a bad URL, Redis unreachable or refusing the
password, no repository, interpreter or checkpoint) stops it with one line that says what to
fix, never a traceback."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import IO, Any

import click

from sd_rest.cluster.broker import (
    BROKER_ENV,
    DEFAULT_HEARTBEAT_TIMEOUT,
    BrokerMissing,
    check_url,
    redact,
    require_extra,
)
from sd_rest.cluster.entries import WorkerRef
from sd_rest.settings import Settings
from sd_rest.setup import check as setup_checks
from sd_rest.setup import paths
from sd_rest.workerhost import checks, quiet
from sd_rest.workerhost.folders import WORKER_DIR_ENV, scratch_folder, worker_dir
from sd_rest.workerhost.stopping import Signals, StopRequested

log = logging.getLogger("sd_rest")

PROG = "stable-diffusion-rest-api worker"


class WorkerStartError(click.ClickException):
    """One line instead of a traceback."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"{PROG}: error: {self.message}", err=True)


class WorkerHelp(click.Command):
    """The server's help layout (one line per flag, its default beside it), not click's
    wrapped columns with ranges."""

    def get_help(self, ctx: click.Context) -> str:
        rows = []
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option) or param.hidden:
                continue
            flags = ", ".join([*param.opts, *param.secondary_opts])
            if param.metavar:
                flags += f" {param.metavar}"
            default = param.default
            if isinstance(default, float):
                default = f"{default:g}"
            plain = param.is_flag or default is None or not isinstance(default, (str, int))
            shown = "" if plain else f"  (default {default})"
            rows.append((flags, f"{param.help or ''}{shown}"))
        width = max(len(flags) for flags, _ in rows) + 4
        lines = ["", "  Usage", f"    $ {PROG} --broker URL [options]", "",
                 f"  {' '.join((self.help or '').split())}", "", "  Options"]  # fmt: skip
        lines += [f"    {flags.ljust(width)}{text}" for flags, text in rows]
        lines += ["", f"  {self.epilog}", ""]
        return "\n".join(lines)


@click.command(
    cls=WorkerHelp,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=f"{WORKER_DIR_ENV} (default ~/.cache/sd-rest/worker) holds the checkpoints' hash "
    "cache and a scratch folder per worker process.",
)
@click.option("--broker", default=None, envvar=BROKER_ENV, metavar="URL",
              help=f"The API node's Redis, redis://[:password@]host:port/db (or {BROKER_ENV})")
@click.option("--repository", default=None, metavar="PATH",
              help="Path to the Stable Diffusion repository (default ./stable-diffusion)")
@click.option("--python", "python", default=None, metavar="PATH",
              help="Interpreter that runs the scripts (default <repository>/venv/bin/python)")
@click.option("--text-to-image-model", default="./models/text-to-image.ckpt",
              metavar="PATH", help="Text-to-image checkpoint (also serves image-to-image)")
@click.option("--inpaint-image-model", default="./models/inpaint-image.ckpt",
              metavar="PATH", help="Inpaint checkpoint")
@click.option("--runner", default="resident",
              type=click.Choice(["resident", "process"]), metavar="resident|process",
              help="resident: keep the scripts' models loaded in a worker; process: one per job")
@click.option("--worker-max-jobs", default=100,
              type=click.IntRange(1, 1_000_000), metavar="N",
              help="Jobs a resident worker runs before it is replaced")
@click.option("--worker-idle", default=600.0, type=click.FloatRange(1, 1e9), metavar="SECONDS",
              help="Seconds a resident worker may idle before it is stopped")
@click.option("--worker-timeout", default=120.0, metavar="SECONDS",
              type=click.FloatRange(1, 1e9),
              help="Seconds a resident worker may go without a heartbeat before it is killed")
@click.option("--warm-start/--no-warm-start", default=True,
              help="Load the text-to-image model in a resident worker before the first job")
@click.option("--concurrency", default=1, type=click.IntRange(1, 64), metavar="N",
              help="Jobs this host runs at once")
@click.option("--heartbeat-timeout", default=DEFAULT_HEARTBEAT_TIMEOUT,
              type=click.FloatRange(1, 3600), metavar="SECONDS",
              help="A host silent this long is dead: its job runs again elsewhere")
@click.option("--demo", is_flag=True, help="Run the bundled simulator: no GPU or model needed")
@click.option("--check", "check_only", is_flag=True,
              help="Check that everything the worker needs is in place, then exit")
def worker(**options: Any) -> None:
    """Run jobs for an API node started with --broker: take them from Redis, run the scripts
    here, send back progress and images."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    quiet.install()
    # Before the slow steps (reaching Redis, hashing the checkpoints): a SIGTERM there stops
    # the start cleanly, not the process halfway.
    signals = Signals(PROG)
    signals.install()
    try:
        _start(signals, **options)  # the options, typed, as _start takes them
    except StopRequested as stop:
        log.info("stopped by %s before taking any job", stop.signame)


def _start(
    signals: Signals,
    *,
    broker: str | None,
    repository: str | None,
    python: str | None,
    text_to_image_model: str,
    inpaint_image_model: str,
    runner: str,
    worker_max_jobs: int,
    worker_idle: float,
    worker_timeout: float,
    warm_start: bool,
    concurrency: int,
    heartbeat_timeout: float,
    demo: bool,
    check_only: bool,
) -> None:
    url = _broker_url(broker)
    ctx = click.get_current_context()
    repo, python_path = paths.scripts_and_python(repository, python, demo)
    if demo:
        text_to_image_model, inpaint_image_model = paths.demo_models(
            ctx, text_to_image_model, inpaint_image_model
        )
    t2i, inpaint = Path(text_to_image_model), Path(inpaint_image_model)
    if check_only:
        target = checks.WorkerTarget(
            url, repo, python_path, python is not None, t2i, inpaint, demo
        )
        ctx.exit(setup_checks.report(checks.run_all(target), click.echo))
    _require(setup_checks.repository(repo))
    _require(setup_checks.scripts(repo))
    _require(setup_checks.interpreter(python_path, python is not None))
    _require_models(t2i, inpaint)
    problem = checks.ping(url)
    if problem is not None:
        raise WorkerStartError(problem)
    try:
        scratch = scratch_folder(worker_dir(), os.getpid())
    except OSError as exc:
        raise WorkerStartError(
            f"cannot make the worker folder {worker_dir()}: {exc.strerror or exc} "
            f"(set {WORKER_DIR_ENV} to a folder this user may write)"
        ) from exc
    settings = Settings(
        repository=repo.absolute(),
        python=python_path.absolute(),
        text_to_image_model=t2i.absolute(),
        inpaint_image_model=inpaint.absolute(),
        output=scratch,
        concurrency=concurrency,
        runner=runner,
        worker_max_jobs=worker_max_jobs,
        worker_idle_seconds=worker_idle,
        worker_timeout=worker_timeout,
        warm_start=warm_start,
    )
    try:
        _serve(signals, url, heartbeat_timeout, settings)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve(signals: Signals, url: str, heartbeat_timeout: float, settings: Settings) -> None:
    from sd_rest.runs.provenance import provenance_for
    from sd_rest.workerhost.host import HostConfig, WorkerHost
    from sd_rest.workerhost.models import held_models

    cache = worker_dir() / "checkpoints.json"
    provenance = provenance_for(settings.output, settings.repository, cache_file=cache)
    try:
        models, missing = held_models(settings, provenance)
    except StopRequested:
        provenance.close()  # the hashing thread stops at its next chunk
        raise
    for line in missing:
        log.warning("%s", line)
    if not models:
        raise WorkerStartError("no checkpoint to serve: " + "; ".join(missing))
    host = socket.gethostname()
    pid = os.getpid()
    ref = WorkerRef(host, pid, f"{host}-{pid}-{secrets.token_hex(4)}")
    log.info("broker %s", redact(url))
    signals.keep()  # the host's threads and warm-up start now: not to be cut halfway
    WorkerHost(HostConfig(url, heartbeat_timeout, settings, models, ref)).run(signals.requested)


def _broker_url(given: str | None) -> str:
    if not given:
        raise WorkerStartError(f"--broker is required (or set {BROKER_ENV}), e.g. "
                               "redis://:password@192.168.1.10:6379/0")  # fmt: skip
    try:
        check_url(given)
    except ValueError as exc:
        raise WorkerStartError(str(exc)) from exc
    try:
        require_extra()
    except BrokerMissing as exc:
        raise WorkerStartError(str(exc)) from exc
    return given


def _require(result: setup_checks.Result) -> None:
    if result.failed:
        raise WorkerStartError(result.message())


def _require_models(*paths: Path) -> None:
    """One checkpoint is enough (its queues are consumed; the other's are left to others);
    none is a mistake."""
    if not any(path.is_file() for path in paths):
        raise WorkerStartError(
            f"no checkpoint found ({', '.join(str(p) for p in paths)}): pass "
            "--text-to-image-model and/or --inpaint-image-model"
        )


