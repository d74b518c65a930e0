"""The command line: the original's flags and help wording, plus a few documented extras."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click

from sd_rest import __version__
from sd_rest.cluster.broker import (
    BROKER_ENV,
    DEFAULT_HEARTBEAT_TIMEOUT,
    BrokerMissing,
    check_url,
    probe,
    redact,
    require_extra,
)
from sd_rest.endpoints import ENDPOINTS
from sd_rest.settings import (
    DEFAULT_MAX_CONNECTIONS,
    Limits,
    Model,
    Settings,
    limits_from_environment,
    loopback_address,
)
from sd_rest.setup import check as checks
from sd_rest.setup import paths
from sd_rest.setup.access import output_problem
from sd_rest.setup.demo import demo_certificate
from sd_rest.state.disk import parse_size

log = logging.getLogger("sd_rest")

API_KEY_ENV = "SD_REST_API_KEY"


@dataclass(frozen=True)
class HelpRow:
    flags: str
    text: str
    default: str | None


HELP_ROWS = [
    HelpRow(
        "--text-to-image-model",
        "Path to the text-to-image model checkpoint",
        "./models/text-to-image.ckpt",
    ),
    HelpRow(
        "--inpaint-image-model",
        "Path to the inpaint image model checkpoint",
        "./models/inpaint-image.ckpt",
    ),
    HelpRow("--concurrency", "Number of concurrent image generation tasks", "1"),
    HelpRow("--output", "Directory to output generated images", "./output"),
    HelpRow("--cert", "Path to the SSL certicate", "./cert.pem"),
    HelpRow("--key", "Path to the SSL certicate key", "./key.pem"),
    HelpRow(
        "--delete-incomplete",
        "Delete all incomplete image generation tasks before starting the server",
        "false",
    ),
    HelpRow("--port", "Port to serve the REST API", "8888"),
    HelpRow("--repository", "Path to the Stable Diffusion repository", paths.DEFAULT_REPOSITORY),
    HelpRow("--host", "Interface to listen on", "0.0.0.0"),
    HelpRow("--python", "Python interpreter that runs the scripts", "<repository>/venv/bin/python"),
    HelpRow("--api-key", f"Require 'Authorization: Bearer <key>' (or set {API_KEY_ENV})", None),
    HelpRow("--max-queue", "Number of waiting tasks before new ones are refused (429)", "1000"),
    HelpRow(
        "--runner",
        "resident: keep the scripts' models loaded in a worker; process: one per task",
        "resident",
    ),
    HelpRow("--worker-max-jobs", "Tasks a resident worker runs before it is replaced", "100"),
    HelpRow("--worker-idle", "Seconds a resident worker may idle before it is stopped", "600"),
    HelpRow(
        "--worker-timeout",
        "Seconds a resident worker may go without a heartbeat before it is killed",
        "120",
    ),
    HelpRow(
        "--no-warm-start",
        "Do not load the text-to-image model in a resident worker before the first task",
        None,
    ),
    HelpRow(
        "--max-connections",
        "Number of open connections; more are closed at once",
        str(DEFAULT_MAX_CONNECTIONS),
    ),
    HelpRow(
        "--min-free-space",
        "Free space kept on the output disk: jobs that would eat into it get 507",
        "1G",
    ),
    HelpRow(
        "--http-port",
        "Also serve the API over plain HTTP on this port (AUTOMATIC1111 clients)",
        None,
    ),
    HelpRow("--http-host", "Interface for --http-port", "127.0.0.1"),
    HelpRow(
        "--broker",
        f"Redis URL of the worker hosts (redis://:password@host:6379/0; or set {BROKER_ENV})",
        None,
    ),
    HelpRow(
        "--heartbeat-timeout",
        "Seconds a worker host may go silent before its job runs elsewhere (with --broker)",
        f"{DEFAULT_HEARTBEAT_TIMEOUT:g}",
    ),
    HelpRow("--demo", "Run against the bundled simulator: no GPU or model needed", "false"),
    HelpRow("--check", "Check that everything the server needs is in place, then exit", "false"),
    HelpRow("-v, --version", "Displays current version", None),
    HelpRow("-h, --help", "Displays this message", None),
]


class OriginalHelp(click.Command):
    """The original's help layout (meow style), so its users find what they know."""

    def get_help(self, ctx: click.Context) -> str:
        width = max(len(row.flags) for row in HELP_ROWS) + 4
        lines = ["", "  Usage", "    $ stable-diffusion-rest-api [options]", "", "  Options"]
        for row in HELP_ROWS:
            default = f"  (default {row.default})" if row.default is not None else ""
            lines.append(f"    {row.flags.ljust(width)}{row.text}{default}")
        lines.append("")
        return "\n".join(lines)


class StartupError(click.ClickException):
    """One clear line (and a hint) instead of a traceback."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"stable-diffusion-rest-api: error: {self.message}", err=True)


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(__version__)
        ctx.exit()


@click.command(cls=OriginalHelp, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--text-to-image-model", default="./models/text-to-image.ckpt")
@click.option("--inpaint-image-model", default="./models/inpaint-image.ckpt")
@click.option("--concurrency", default=1, type=click.IntRange(1, 64))
@click.option("--output", default="./output")
@click.option("--cert", default="./cert.pem")
@click.option("--key", default="./key.pem")
@click.option("--delete-incomplete", is_flag=True, default=False)
@click.option("--port", default=8888, type=click.IntRange(0, 65535))
@click.option("--repository", default=None)
@click.option("--host", default="0.0.0.0")
@click.option("--python", "python", default=None)
@click.option("--api-key", default=None, envvar=API_KEY_ENV, show_envvar=True)
@click.option("--max-queue", default=1000, type=click.IntRange(1, 1_000_000))
@click.option("--runner", default="resident", type=click.Choice(["resident", "process"]))
@click.option("--worker-max-jobs", default=100, type=click.IntRange(1, 1_000_000))
@click.option("--worker-idle", default=600.0, type=click.FloatRange(1, 1e9))
@click.option("--worker-timeout", default=120.0, type=click.FloatRange(1, 1e9))
@click.option("--warm-start/--no-warm-start", default=True)
@click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, type=click.IntRange(1, 100_000))
@click.option("--min-free-space", default="1G")
@click.option("--http-port", default=None, type=click.IntRange(0, 65535))
@click.option("--http-host", default=None)
@click.option("--broker", default=None, envvar=BROKER_ENV, show_envvar=True)
@click.option(
    "--heartbeat-timeout", default=DEFAULT_HEARTBEAT_TIMEOUT, type=click.FloatRange(1, 3600)
)
@click.option("--demo", is_flag=True, default=False)
@click.option("--check", "check_only", is_flag=True, default=False)
@click.option("-v", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_version)
def main(
    text_to_image_model: str,
    inpaint_image_model: str,
    concurrency: int,
    output: str,
    cert: str,
    key: str,
    delete_incomplete: bool,
    port: int,
    repository: str | None,
    host: str,
    python: str | None,
    api_key: str | None,
    max_queue: int,
    runner: str,
    worker_max_jobs: int,
    worker_idle: float,
    worker_timeout: float,
    warm_start: bool,
    max_connections: int,
    min_free_space: str,
    http_port: int | None,
    http_host: str | None,
    broker: str | None,
    heartbeat_timeout: float,
    demo: bool,
    check_only: bool,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # watchfiles logs every batch of changes it sees at INFO: one line per image is noise.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    _check_api_key(api_key)
    limits = _limits()
    min_free = _size("--min-free-space", min_free_space)
    broker = _broker(broker)
    output_path = Path(output).absolute()
    if check_only and demo:
        raise StartupError("--check checks a real set-up: demo mode needs none, leave out --demo")
    repo, python_path = paths.scripts_and_python(repository, python, demo)
    if demo:
        text_to_image_model, inpaint_image_model = paths.demo_models(
            click.get_current_context(), text_to_image_model, inpaint_image_model
        )
        _check_output(output_path)  # the throwaway certificate is made there
        cert, key = _demo_certificate(cert, key, output_path)
    if check_only:
        target = checks.Target(
            repository=repo,
            python=python_path,
            python_explicit=python is not None,
            text_to_image_model=Path(text_to_image_model),
            inpaint_image_model=Path(inpaint_image_model),
            cert=cert,
            key=key,
            output=output_path,
            host=host,
            port=port,
            min_free_space=min_free,
        )
        click.get_current_context().exit(checks.report(checks.run_all(target), click.echo))
    if broker is None:  # with one, the worker hosts run the scripts: none are needed here
        _check_repository(repo)
        _check_python(python_path, explicit=python is not None)
    context = _load_certificate(cert, key)
    settings = Settings(
        repository=repo.absolute(),
        python=python_path.absolute(),
        text_to_image_model=Path(text_to_image_model).absolute(),
        inpaint_image_model=Path(inpaint_image_model).absolute(),
        output=output_path,
        concurrency=concurrency,
        max_queue=max_queue,
        api_key=api_key or None,
        min_free_space=min_free,
        max_connections=max_connections,
        limits=limits,
        runner=runner,
        worker_max_jobs=worker_max_jobs,
        worker_idle_seconds=worker_idle,
        worker_timeout=worker_timeout,
        warm_start=warm_start,
        broker=broker,
        heartbeat_timeout=heartbeat_timeout,
    )
    for model in Model if broker is None else ():
        path = settings.checkpoint(model)
        # Missing or damaged is a warning (its endpoints answer 503 or fail); out of this
        # user's reach is a set-up mistake that stops the start.
        _require(checks.checkpoint_access(path, model.value))
        found = checks.checkpoint_contents(path, model.value, verify_sha256=False)
        # The simulator's placeholder checkpoints are not real ones: only say when one is gone.
        if found.failed and (not demo or not path.exists()):
            users = ", ".join(f"/{e.name}" for e in ENDPOINTS.values() if e.model == model)
            until = "answer 503 until it exists" if not path.exists() else "fail until it is fixed"
            log.warning("%s: %s will %s (fix: %s)", found.detail, users, until, found.fix)
    if not demo:  # demo mode checked it before making its certificate there
        _check_output(output_path)
    if host in ("0.0.0.0", "::", "") and not settings.api_key:
        log.warning(
            "listening on all interfaces without an API key: anyone on the network can use "
            "this server (set --api-key or %s)",
            API_KEY_ENV,
        )
    if broker is not None:
        unreachable = probe(broker)
        if unreachable is not None:  # served from the node's own state; POSTs get 503
            log.warning("%s; new jobs are refused (503) until it answers", unreachable)
    run_server(
        settings, host, port, context, delete_incomplete, _http(http_port, http_host, api_key)
    )


def _http(port: int | None, host: str | None, api_key: str | None) -> tuple[str, int] | None:
    """--http-port: plain HTTP, for the AUTOMATIC1111 clients that expect it; on the loopback
    interface unless --http-host names another, which is worth a warning without a key."""
    if port is None:
        if host is not None:
            raise StartupError("--http-host needs --http-port")
        return None
    if host is not None and not loopback_address(host) and not api_key:
        log.warning(
            "serving plain HTTP on %s without an API key: anyone who reaches it can use this "
            "server, and nothing it sends is encrypted (set --api-key or %s)",
            host,
            API_KEY_ENV,
        )
    return (host or "127.0.0.1", port)


def _broker(url: str | None) -> str | None:
    """The broker's URL, checked, with the extra it needs; None without one."""
    if url is None or url == "":
        return None
    try:
        check_url(url)
        require_extra()
    except (ValueError, BrokerMissing) as exc:
        raise StartupError(str(exc)) from exc
    return url


def entry() -> None:
    """The installed command: `worker ...` runs a worker host (workerhost/command.py);
    everything else is the server's command line."""
    args = sys.argv[1:]
    if args[:1] == ["worker"]:
        from sd_rest.workerhost.command import PROG, worker

        worker.main(args=args[1:], prog_name=PROG)
    else:
        main.main(args=args, prog_name="stable-diffusion-rest-api")


def run_server(
    settings: Settings,
    host: str,
    port: int,
    context: ssl.SSLContext,
    delete_incomplete: bool,
    http: tuple[str, int] | None = None,
) -> None:
    # Imported here so that --help and --version do not load aiohttp and the rest.
    from sd_rest.jobs.manager import JobManager
    from sd_rest.server import StartFailed, serve

    manager = JobManager(settings)
    if delete_incomplete:
        try:
            removed = manager.recovery.delete_incomplete()
        except OSError as exc:
            raise StartupError(
                output_problem(settings.output, "delete the incomplete jobs", exc)
            ) from exc
        click.echo(f"deleted {removed} incomplete job(s) from {settings.output}")

    def ready(url: str) -> None:
        runs = (
            f"repository {settings.repository}, concurrency {settings.concurrency}"
            if settings.broker is None
            else f"jobs run by the worker hosts of {redact(settings.broker)}"
        )
        click.echo(f"sd-rest {__version__} serving {url} ({runs})", err=True)

    try:
        asyncio.run(serve(manager, host, port, context, on_ready=ready, http=http))
    except StartFailed as exc:
        raise StartupError(str(exc)) from exc


def _check_api_key(api_key: str | None) -> None:
    """Refuse a key no client could send: an empty one would silently switch the check off."""
    if api_key is None:
        return
    if not api_key:
        raise StartupError(f"the API key is empty (--api-key or {API_KEY_ENV})")
    if not all(0x21 <= ord(char) <= 0x7E for char in api_key):
        raise StartupError(
            "the API key must be printable ASCII without spaces: it is sent in an HTTP header"
        )


def _limits() -> Limits:
    try:
        return limits_from_environment(os.environ)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc


def _size(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise StartupError(f"{flag}: {exc}") from exc


def _require(*results: checks.Result | None) -> None:
    """Start-up's share of --check: stop at the first failure, with the same words."""
    for result in results:
        if result is None:
            continue
        if result.failed:
            raise StartupError(result.message())
        if result.status == checks.WARN:
            log.warning("%s", result.message())


def _check_repository(repo: Path) -> None:
    _require(checks.repository(repo))
    _require(checks.scripts(repo))


def _check_python(python: Path, explicit: bool) -> None:
    _require(checks.interpreter(python, explicit))


def _load_certificate(cert: str, key: str) -> ssl.SSLContext:
    from sd_rest.api.app import ssl_context

    _require(checks.certificate(cert, key))
    try:
        return ssl_context(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"cannot use {cert} and {key} as certificate and key: {exc}") from exc


def _check_output(output: Path) -> None:
    _require(checks.output_folder(output, create=True), checks.job_index(output))


def _demo_certificate(cert: str, key: str, output: Path) -> tuple[str, str]:
    if paths.is_file(cert) and paths.is_file(key):
        return cert, key
    try:
        demo_cert, demo_key, made = demo_certificate(output)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise StartupError(f"could not make a demo certificate with openssl: {exc}") from exc
    if made:
        click.echo(
            f"demo mode: made a throwaway self-signed certificate {demo_cert} (key {demo_key}); "
            "curl needs --insecure (-k) with it",
            err=True,
        )
    return str(demo_cert), str(demo_key)
