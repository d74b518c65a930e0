"""Is everything the server needs in place? One result per item, each failure with its fix.

Every check is a small function returning a `Result`. Start-up (cli.py) runs the cheap ones and
stops at the first failure with its words; `stable-diffusion-rest-api --check` runs them all,
the expensive ones too (the scripts' imports in the fork's interpreter, checksums), and prints
one line each.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import stat
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sd_rest.endpoints import ENDPOINTS, INPAINT_CONFIG, INPAINT_IMAGE, TEXT_TO_IMAGE
from sd_rest.scripts import script_environment
from sd_rest.settings import DEFAULT_MIN_FREE
from sd_rest.setup import access, fork_imports
from sd_rest.setup.certinfo import CertificateError, pem_certificates, private_key_kind, validity
from sd_rest.setup.checkpoints import (
    FULL_CHECKPOINT_BYTES,
    MIN_CHECKPOINT_BYTES,
    checkpoint_format,
    expected_sha256,
    has_zip_end_record,
    sha256_of,
)
from sd_rest.state.disk import free_bytes
from sd_rest.state.layout import Layout

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
GiB = 1024**3
DEFAULT_MIN_FREE_SPACE = DEFAULT_MIN_FREE  # the server's own default (--min-free-space)
CONFIGS = ("configs/stable-diffusion/v1-inference.yaml", str(INPAINT_CONFIG))
CERTIFICATE_WARNING_DAYS = 14
CONSTRAINTS = Path(__file__).resolve().parents[2] / "scripts" / "fork-constraints.txt"
MAKE_CERTIFICATE = (
    "run scripts/setup.sh cert (mkcert when installed, else openssl), or: mkcert -install && "
    "mkcert -cert-file cert.pem -key-file key.pem 0.0.0.0 localhost 127.0.0.1"
)


@dataclass(frozen=True)
class Result:
    item: str
    status: str  # OK, WARN, FAIL or SKIP
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def message(self) -> str:
        """The words start-up errors and --check lines share."""
        return f"{self.detail}; fix: {self.fix}" if self.fix else self.detail

    def line(self) -> str:
        return f"{self.status:>4}  {self.item:<21} {self.message()}"


def _ok(item: str, detail: str) -> Result:
    return Result(item, OK, detail)


def _fail(item: str, detail: str, fix: str) -> Result:
    return Result(item, FAIL, detail, fix)


def _out_of_reach(item: str, what: str, path: Path, otherwise: str) -> Result | None:
    """A failure when `path` cannot even be looked up (a folder on the way this user may not
    enter, a loop of links ...): `what` names it ("SSL certificate ./cert.pem"), `otherwise`
    is the fix beside opening it."""
    problem = access.reach(path)
    if problem is None:
        return None
    fix = f"{problem.fix}, or {otherwise}" if problem.fix else otherwise
    return _fail(item, f"{what} is out of reach: {problem.reason}", fix)


def _unreadable(
    item: str, what: str, path: Path, otherwise: str, whole: Path | None = None
) -> Result | None:
    """A failure when `path` is out of reach, or is there but this user may not read it (a
    folder: list and enter); None when it is readable or not there (its own check says so).
    The fix opens `whole` when given (the repository, for one of its scripts: the rest of it
    is alike)."""
    blocked = _out_of_reach(item, what, path, otherwise)
    if blocked is not None:
        return blocked
    mode = os.R_OK | os.X_OK if path.is_dir() else os.R_OK
    if not path.exists() or os.access(path, mode):
        return None
    opened = whole or path
    return _fail(
        item,
        f"{what} is not readable by {access.user()}",
        f"{access.readable_fix(opened, folder=opened.is_dir())}, or {otherwise}",
    )


# --- repository and interpreter -----------------------------------------------------------


def repository(repo: Path) -> Result:
    what = f"the Stable Diffusion repository {repo}"
    unreadable = _unreadable("repository", what, repo, "pass --repository")
    if unreadable is not None:
        return unreadable
    if not repo.is_dir():
        return _fail(
            "repository",
            f"Stable Diffusion repository not found at {repo}",
            "run scripts/setup.sh, or pass --repository (--demo needs none)",
        )
    return _ok("repository", str(repo))


def _unreadable_part(repo: Path) -> Result | None:
    """A script or config of the repository that this user cannot read."""
    for name in (*(e.script for e in ENDPOINTS.values()), *CONFIGS):
        unreadable = _unreadable(
            "scripts", f"{repo}: {name}", repo / name, "pass --repository", whole=repo
        )
        if unreadable is not None:
            return unreadable
    return None


def scripts(repo: Path) -> Result:
    unreadable = _unreadable_part(repo)
    if unreadable is not None:
        return unreadable
    for endpoint in ENDPOINTS.values():
        if not (repo / endpoint.script).is_file():
            return _fail(
                "scripts",
                f"{repo} is not a Stable Diffusion repository: {endpoint.script} is missing",
                "pass --repository with a clone of the bfirsh/stable-diffusion fork "
                "(scripts/setup.sh makes one)",
            )
    for config in CONFIGS:
        if not (repo / config).is_file():
            return _fail(
                "scripts",
                f"{repo} is not a whole Stable Diffusion repository: {config} is missing",
                f"restore it (git -C {repo} checkout -- {config}), or fetch the fork again",
            )
    names = ", ".join(Path(e.script).name for e in ENDPOINTS.values())
    return _ok("scripts", f"{names} and both model configs")


def interpreter(python: Path, explicit: bool) -> Result:
    """Cheap: the file is there and executable (start-up)."""
    fix = (
        "check --python"
        if explicit
        else "create the fork's venv (scripts/setup.sh) or pass --python"
    )
    what = f"the scripts' Python interpreter {python}"
    blocked = _out_of_reach("interpreter", what, python, fix)
    if blocked is not None:
        return blocked
    if python.is_symlink() and not python.exists():
        return _fail(
            "interpreter",
            f"the scripts' Python interpreter {python} is a broken link to "
            f"{os.readlink(python)}: the Python that made its venv is gone",
            fix if explicit else "delete the venv and run scripts/setup.sh again",
        )
    if not (python.is_file() and os.access(python, os.X_OK)):
        return _fail(
            "interpreter",
            f"the scripts' Python interpreter {python} is missing or not executable",
            fix,
        )
    return _ok("interpreter", str(python))


def interpreter_runs(python: Path, timeout: float = 60) -> Result:
    """Expensive: it starts and says its version (--check)."""
    code = "import platform; print(platform.python_version())"
    try:
        run = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        run = None
        error = str(exc)
    else:
        error = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
    if run is None or run.returncode != 0:
        return _fail(
            "interpreter",
            f"the scripts' Python interpreter {python} does not run: {error}",
            "delete the fork's venv and run scripts/setup.sh again, or pass --python",
        )
    return _ok("interpreter", f"{python} (Python {run.stdout.strip()})")


def imports(python: Path, repo: Path, timeout: float = 900) -> list[Result]:
    """Everything the three scripts import, loaded by the fork's interpreter with the server's
    script environment: one result per distinct problem, then the device the scripts will use."""
    # Absolute, as the server's settings are: the check runs in the repository.
    python, repo = python.absolute(), repo.absolute()
    constraints = str(CONSTRAINTS) if CONSTRAINTS.is_file() else fork_imports.DEFAULT_CONSTRAINTS
    # Run by path through runpy, not as `python <file>`: that would put sd_rest/ first on the
    # fork's sys.path, where our queue.py and the like would shadow the modules it imports.
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    try:
        run = subprocess.run(
            [
                str(python),
                "-c",
                probe,
                fork_imports.__file__,
                "--json",
                "--constraints",
                constraints,
            ],
            capture_output=True,
            text=True,
            cwd=repo,
            env=script_environment(os.environ, repo),
            timeout=timeout,
        )
        report = json.loads((run.stdout.strip().splitlines() or ["null"])[-1])
        if not isinstance(report, dict):
            raise ValueError(run.stderr.strip()[-500:] or f"exit status {run.returncode}")
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return [
            _fail(
                "imports",
                f"{python} could not run the import check: {exc}",
                "run scripts/setup.sh verify to see why",
            )
        ]
    problems = fork_imports.diagnose(report, constraints)
    results = [_fail("imports", problem, fix) for problem, fix in problems]
    if not results:
        versions = {r["distribution"]: r.get("version") for r in report["results"]}
        shown = ", ".join(
            f"{name} {versions[name]}"
            for name in ("torch", "transformers", "diffusers", "pytorch-lightning")
            if versions.get(name)
        )
        results.append(_ok("imports", f"all {len(report['results'])} load ({shown})"))
    return [*results, device(report.get("device"), report.get("platform", ""))]


def device(name: str | None, platform: str) -> Result:
    if name is None:
        return Result("device", SKIP, "unknown: torch does not import")
    if name in ("mps", "cuda"):
        return _ok("device", f"{name}: the scripts run on the GPU")
    if platform == "darwin":
        return Result(
            "device",
            WARN,
            "cpu: PyTorch sees no MPS device, so the scripts will be very slow",
            "use an arm64 (not Rosetta) Python on an Apple-silicon Mac with macOS 14 or newer",
        )
    return Result("device", WARN, "cpu: no CUDA device, so the scripts will be very slow")


# --- checkpoints --------------------------------------------------------------------------


def checkpoint_access(path: Path, model: str) -> Result | None:
    """A failure when the checkpoint is there (or may be) but this user cannot read it: the
    server stops at start for it, where a missing or damaged one is only a warning."""
    what = f"{model} model checkpoint {path}"
    return _unreadable(f"{model} model", what, path, f"pass --{model}-model")


def checkpoint(path: Path, model: str, verify_sha256: bool = True) -> Result:
    """A checkpoint the scripts can load: there, readable, a torch.save file (zip since torch
    1.6, pickle before), not truncated, and matching its SHA-256 when that is known."""
    unreadable = checkpoint_access(path, model)
    if unreadable is not None:
        return unreadable
    return checkpoint_contents(path, model, verify_sha256)


def checkpoint_contents(path: Path, model: str, verify_sha256: bool = True) -> Result:
    """`checkpoint` once `checkpoint_access` has passed (start-up runs that one on its own:
    it stops the start, where what this finds is only a warning)."""
    try:
        return _checkpoint_file(path, model, verify_sha256)
    except OSError as exc:  # a read error (checkpoint_access passed), or the checksum file
        return _fail(
            f"{model} model",
            f"{model} model checkpoint {exc.filename or path} cannot be read: "
            f"{exc.strerror or exc}",
            f"check the disk, or pass --{model}-model",
        )


def _checkpoint_file(path: Path, model: str, verify_sha256: bool) -> Result:
    item, flag = f"{model} model", f"--{model}-model"
    redo = f"delete it and run scripts/setup.sh models to download it again, or pass {flag}"
    if not path.exists():
        return _fail(
            item,
            f"{model} model checkpoint not found at {path}",
            f"run scripts/setup.sh models to download it, or pass {flag}",
        )
    if not path.is_file():
        return _fail(item, f"{model} model checkpoint {path} is not a file", f"pass {flag}")
    # Readable by this user (checkpoint_access): an error now is the disk's, said by the caller.
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(64)
    kind = checkpoint_format(head)
    not_one = f"{model} model checkpoint {path} is not a PyTorch checkpoint"
    if kind == "html":
        return _fail(item, f"{not_one}: it is a web page (a failed download?)", redo)
    if kind == "git-lfs":
        return _fail(item, f"{not_one}: it is a Git LFS pointer, not the file", redo)
    if kind == "safetensors":
        return _fail(
            item, f"{not_one}: it is a .safetensors file, which the fork cannot load", redo
        )
    if kind == "unknown" or size < MIN_CHECKPOINT_BYTES:
        return _fail(item, f"{not_one} ({_size(size)}, neither a zip nor a pickle)", redo)
    facts = [_size(size)]
    if kind == "zip":
        if not has_zip_end_record(path, size):
            return _fail(
                item,
                f"{model} model checkpoint {path} is truncated: its zip has no "
                "end-of-central-directory record (an interrupted download?)",
                redo,
            )
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            return _fail(item, f"{model} model checkpoint {path} is damaged: {exc}", redo)
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return _fail(item, f"{not_one}: a zip without data.pkl", redo)
        facts.append("torch zip format")
    else:
        facts.append("legacy torch pickle format (truncation not detectable)")
    if verify_sha256:
        expected = expected_sha256(path, size)
        if expected is None:
            facts.append("checksum not known")
        elif sha256_of(path) != expected[0]:
            return _fail(
                item,
                f"{model} model checkpoint {path} does not match the SHA-256 of "
                f"{expected[1]}: it is damaged",
                redo,
            )
        else:
            facts.append(f"SHA-256 matches {expected[1]}")
    detail = f"{path}: {', '.join(facts)}"
    if size < FULL_CHECKPOINT_BYTES:
        return Result(
            item, WARN, f"{detail}; smaller than any Stable Diffusion v1 checkpoint: a test model?"
        )
    return _ok(item, detail)


def _scaled(size: int, units: tuple[tuple[str, int], ...]) -> str:
    for unit, scale in units:
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _size(size: int) -> str:
    """A file's size in decimal units: checkpoints are quoted in GB."""
    return _scaled(size, (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)))


def _space(size: int) -> str:
    """Disk space in binary units, as the minimum is set (1 GiB)."""
    return _scaled(size, (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)))


# --- certificate --------------------------------------------------------------------------


def certificate(cert: str | Path, key: str | Path, now: datetime | None = None) -> Result:
    """A PEM certificate and its key that the server can load, valid now. The paths are
    shown as given (`./cert.pem`, the original's default)."""
    item = "certificate"
    now = now or datetime.now(timezone.utc)
    contents = {}
    for label, name, flag in (("certificate", cert, "--cert"), ("certificate key", key, "--key")):
        path = Path(name)
        unreadable = _unreadable(item, f"SSL {label} {name}", path, f"pass {flag}")
        if unreadable is not None:
            return unreadable
        if not path.is_file():
            return _fail(item, f"SSL {label} {name} not found", MAKE_CERTIFICATE)
        try:
            contents[label] = path.read_bytes()
        except OSError as exc:  # readable by this user (above): the disk's error
            return _fail(
                item,
                f"SSL {label} {name} cannot be read: {exc.strerror or exc}",
                f"check the disk, or pass {flag}",
            )
    new_pair = f"pass the right --cert and --key, or make a new pair: {MAKE_CERTIFICATE}"
    try:
        ders = pem_certificates(contents["certificate"])
        if not ders:
            raise CertificateError("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        not_before, not_after = validity(ders[0])
    except CertificateError as exc:
        return _fail(item, f"cannot use {cert} as the certificate: {exc}", new_pair)
    kind = private_key_kind(contents["certificate key"])
    if kind is None:
        return _fail(
            item, f"cannot use {key} as the certificate key: it holds no PEM private key", new_pair
        )
    if kind.startswith("ENCRYPTED"):
        return _fail(
            item,
            f"cannot use {key} as the certificate key: it is protected by a passphrase, which "
            "the server cannot ask for",
            f"write it without one (openssl pkey -in {key} -out key-plain.pem) and pass that",
        )
    if now < not_before:
        return _fail(
            item,
            f"the certificate {cert} is not valid before {not_before:%Y-%m-%d %H:%M} UTC",
            "check this machine's clock, or make a new pair",
        )
    if now > not_after:
        return _fail(
            item,
            f"the certificate {cert} expired on {not_after:%Y-%m-%d}",
            f"delete {cert} and {key}, then {MAKE_CERTIFICATE}",
        )
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return _fail(
                item, f"cannot use {cert} and {key}: the key is not this certificate's", new_pair
            )
        return _fail(item, f"cannot use {cert} and {key} as certificate and key: {exc}", new_pair)
    detail = f"{cert} and {key}, valid until {not_after:%Y-%m-%d}"
    if not_after - now < timedelta(days=CERTIFICATE_WARNING_DAYS):
        return Result(item, WARN, f"{detail}: expires soon", "make a new pair before then")
    return _ok(item, detail)


# --- output folder, free space, port -------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_folder(output: Path, create: bool) -> Result:
    """Writable (a file is really made and removed). A folder that does not exist yet passes
    when it could be made, and with `create` is made: the same words for a start and --check."""
    item = "output folder"
    blocked = _out_of_reach(item, f"the output folder {output}", output, "pass --output")
    if blocked is not None:
        return blocked
    target = output if output.exists() else _existing_ancestor(output)
    if not target.is_dir():
        return _fail(item, f"the output folder {output}: {target} is not a folder", "pass --output")
    unwritable = _unwritable(output, target)
    if unwritable is not None:
        return unwritable
    if create:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # what the probe could not foresee (a dangling link, a race)
            return _fail(
                item, f"cannot create the output folder {output}: {exc.strerror}", "pass --output"
            )
    foreign = _foreign_folder(output)
    if foreign is not None:
        return _fail(
            item,
            f"the output folder {output} holds {foreign}, which {access.user()} may not change "
            "(made by another user?)",
            f"{access.owner_fix(output)}, or pass --output",
        )
    return _ok(item, f"{output}: writable" + ("" if output.exists() else " (made at start)"))


def _write_error(folder: Path) -> OSError | None:
    """Why this user cannot make a file in `folder` (one is really made and removed), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sd-rest-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc
    return None


def _unwritable(output: Path, target: Path) -> Result | None:
    """A failure when this user cannot make a file in `target`: the output folder, or the
    nearest folder above it that exists, where it would be made."""
    error = _write_error(target)
    if error is None:
        return None
    there = target == output
    where = f"the output folder {output} " + (
        "is not writable" if there else f"cannot be created: {target} is not writable"
    )
    if error.errno in (errno.EACCES, errno.EPERM):
        # Not the folder above: it may be /srv, or /, and is not this user's to take. Only the
        # output folder is, made by someone who may.
        fix = access.owner_fix(output)
        if not there:
            fix = f"mkdir -p {output} && {access.owner_fix(output, folder=False)}"
        return _fail("output folder", f"{where} by {access.user()}", f"{fix}, or pass --output")
    # A read-only disk, say: no owner to change.
    fix = "make it writable, or pass --output" if there else "pass --output"
    return _fail("output folder", f"{where} ({error.strerror or error})", fix)


def _foreign_folder(output: Path) -> Path | None:
    """A folder of the server's own under `output` that this user may not read, enter and
    write: jobs cannot be recovered or written there."""
    layout = Layout(output)
    folders = [layout.queue_dir, layout.quarantine_dir, *map(layout.endpoint_dir, ENDPOINTS)]
    for folder in folders:
        usable = os.access(folder, os.R_OK | os.W_OK | os.X_OK)
        if folder.is_dir() and not folder.is_symlink() and not usable:
            return folder
    return None


def job_index(output: Path) -> Result:
    """The SQLite index of the jobs (index.py): derived data, made again from the job folders
    when it cannot be opened, so only what the server could neither open nor replace fails."""
    item = "job index"
    layout = Layout(output)
    index = layout.index_file
    remake = "delete it (the server makes it again from the job folders)"
    for path in layout.index_files:
        try:
            # Not following a link, as the server does not: it moves any link out of the way.
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problem = access.explain(path, exc)
            return _fail(item, f"the job index {path} is out of reach: {problem.reason}", remake)
        if not stat.S_ISREG(info.st_mode):
            if not _replaceable(path, info):
                return _fail(
                    item,
                    f"the job index {path} is not a file, and {access.user()} may not move it "
                    "out of the way",
                    f"rm -r {path} (the server makes it again from the job folders)",
                )
            return Result(
                item,
                WARN,
                f"{path} is not a file: the server moves it to the quarantine and makes the "
                "index again from the job folders",
            )
        if os.access(path, os.R_OK | os.W_OK):
            continue
        if not _replaceable(path, info):
            return _fail(
                item,
                f"the job index {path} is not readable and writable by {access.user()}, "
                "who may not replace it either",
                f"{remake}, or {access.readable_fix(path)}",
            )
        return Result(
            item,
            WARN,
            f"{path} is not readable and writable by {access.user()}: the server makes the "
            "index again from the job folders",
        )
    return _ok(item, str(index) if index.exists() else f"{index} (made at start)")


def _replaceable(path: Path, info: os.stat_result) -> bool:
    """Whether this user may delete `path` (and make a new one in its folder); `info` is its
    own (lstat's), not a link's target's: the sticky bit asks who owns the link."""
    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    sticky = folder.stat()
    uid = os.geteuid()
    return not sticky.st_mode & stat.S_ISVTX or uid in (0, info.st_uid, sticky.st_uid)


def free_space(output: Path, minimum: int = DEFAULT_MIN_FREE_SPACE) -> Result:
    item = "free space"
    try:
        free = free_bytes(output)  # as the server measures it before taking a job
    except OSError as exc:
        return Result(item, SKIP, f"cannot be measured for {output}: {exc.strerror or exc}")
    if free < minimum:
        return _fail(
            item,
            f"only {_space(free)} free for the output folder {output} ({_space(minimum)} needed)",
            "free some space, pass --output on another disk, or lower --min-free-space",
        )
    return _ok(item, f"{_space(free)} free for {output} ({_space(minimum)} needed)")


def port(host: str, number: int) -> Result:
    """The server could listen there now: bound the way asyncio's server binds."""
    item = "port"
    where = f"{host}:{number}"
    try:
        addresses = socket.getaddrinfo(
            host or None, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return _fail(
            item, f"cannot listen on {where}: {exc.strerror}", "pass --host 0.0.0.0 or 127.0.0.1"
        )
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return _port_failure(where, exc)
    return _ok(item, f"{where} is free")


def _port_failure(where: str, exc: OSError) -> Result:
    if exc.errno == errno.EADDRINUSE:
        return _fail(
            "port",
            f"cannot listen on {where}: the port is in use (is the server already running?)",
            "stop what uses it, or pass --port",
        )
    if exc.errno == errno.EACCES:
        return _fail(
            "port",
            f"cannot listen on {where}: {exc.strerror} (ports below 1024 need root)",
            "pass a --port above 1023",
        )
    return _fail(
        "port", f"cannot listen on {where}: {exc.strerror or exc}", "pass --host or --port"
    )


# --- all of it ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What the server would use, as the command line resolved it."""

    repository: Path
    python: Path
    python_explicit: bool
    text_to_image_model: Path
    inpaint_image_model: Path
    cert: str
    key: str
    output: Path
    host: str
    port: int
    min_free_space: int = DEFAULT_MIN_FREE_SPACE


def run_all(target: Target) -> Iterable[Result]:
    """Every check, in the order a user fixes things; each result as soon as it is known."""
    repo = repository(target.repository)
    yield repo
    repo_ok = not repo.failed
    yield scripts(target.repository) if repo_ok else Result("scripts", SKIP, "needs the repository")
    python = interpreter(target.python, target.python_explicit)
    if not python.failed:
        python = interpreter_runs(target.python)
    yield python
    if repo_ok and not python.failed:
        yield from imports(target.python, target.repository)
    else:
        yield Result("imports", SKIP, "needs the repository and the interpreter")
    yield checkpoint(target.text_to_image_model, TEXT_TO_IMAGE)
    yield checkpoint(target.inpaint_image_model, INPAINT_IMAGE)
    yield certificate(target.cert, target.key)
    output = output_folder(target.output, create=False)
    yield output
    yield (
        job_index(target.output)
        if not output.failed
        else Result("job index", SKIP, "needs the output folder")
    )
    yield free_space(target.output, target.min_free_space)
    yield port(target.host, target.port)


def report(results: Iterable[Result], echo: Callable[[str], None]) -> int:
    """Print one line per result and a summary; the exit status (0: ready)."""
    seen: list[Result] = []
    for result in results:
        echo(result.line())
        seen.append(result)
    failed = sum(r.failed for r in seen)
    warned = sum(r.status == WARN for r in seen)
    note = f" ({warned} warning{'s' if warned != 1 else ''})" if warned else ""
    if failed:
        echo(f"not ready: {failed} item{'s' if failed != 1 else ''} failed{note}")
        return 1
    echo(f"ready: everything the server needs is in place{note}")
    return 0
