"""Start-up as an ordinary user: every path the server opens at start (repository, interpreter,
checkpoints, certificate, key, output folder, job index, the jobs it recovers) out of that
user's reach ends in one line naming the path and the fix, the same words for a start and for
`--check`, with a non-zero status and never a traceback.

The tests run as root, who may read anything: the server runs as `nobody` (setpriv), on
files and folders root owns with modes that shut nobody out, in a folder under /tmp that
nobody can enter (pytest's own tmp_path is root's alone).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from forkfakes import certificate_pair, fork_tree, torch_zip_checkpoint

SETPRIV = shutil.which("setpriv")
AS_NOBODY = [str(SETPRIV), "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
ERROR = "stable-diffusion-rest-api: error: "
WHO = "user nobody"
JOB_ID = "0123456789abcdef0123456789abcdef"


def nobody_environment(home: Path) -> dict[str, str]:
    # Without the suite's coverage hook: nobody may not write root's coverage data.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE", "SD_REST_COV"))}
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def nobody_can_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to make files that nobody may not read and run as nobody")
    if SETPRIV is None:
        pytest.skip("needs setpriv (util-linux) to run the server as nobody")
    probe = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", "import sd_rest.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=nobody_environment(Path("/")),
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [f"status {probe.returncode}"])[-1]
        pytest.skip(
            f"nobody cannot run sd_rest with {sys.executable} ({last}): the venv and the "
            "project must be readable by others, and the folders on their way o+x"
        )


@dataclass
class World:
    """A set-up that works for nobody, and the means to break one part of it."""

    root: Path

    def __post_init__(self) -> None:
        self.locked = self.folder("locked", 0o700)  # root's alone: nobody may not enter
        self.repo = fork_tree(self.root / "repo")
        self.python = self.root / "bin" / "python"
        self.python.parent.mkdir()
        # Start-up only checks that the interpreter is there and executable: these tests
        # never get as far as running a script (`--check` runs it, and reports on it).
        self.python.write_text("#!/bin/sh\nexit 0\n")
        self.models = {
            name: torch_zip_checkpoint(self.root / f"{name}.ckpt")
            for name in ("text-to-image", "inpaint-image")
        }
        self.cert, self.key = certificate_pair(self.root)
        self.output = self.folder("output", 0o777)
        for path in self.root.rglob("*"):
            if path.is_file() and path.parent != self.locked:
                path.chmod(0o755 if path == self.python else 0o644)
            elif path.is_dir() and path != self.locked and path != self.output:
                path.chmod(0o755)

    def folder(self, name: str, mode: int) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        return path

    def paths(self) -> dict[str, Path]:
        """Each path option and the working path the world gives it."""
        return {
            "repository": self.repo,
            "python": self.python,
            "text-to-image-model": self.models["text-to-image"],
            "inpaint-image-model": self.models["inpaint-image"],
            "cert": self.cert,
            "key": self.key,
            "output": self.output,
        }

    def args(self, **overrides: Path) -> list[str]:
        paths = {
            **self.paths(),
            **{name.replace("_", "-"): path for name, path in overrides.items()},
        }
        # The stub interpreter runs no script: a warm-up would only fail (and say so).
        args = ["--host", "127.0.0.1", "--port", "0", "--no-warm-start"]
        for flag, path in paths.items():
            args += [f"--{flag}", str(path)]
        return args

    def copy_into(self, folder: Path, flag: str) -> Path:
        """A copy in `folder` of the working path `flag` names; for the output folder only
        its path (the server makes it)."""
        source = self.paths()[flag]
        copy = folder / source.name
        if flag == "output":
            return copy
        if source.is_dir():
            shutil.copytree(source, copy)
        else:
            shutil.copy2(source, copy)
        return copy

    def run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [*AS_NOBODY, sys.executable, "-m", "sd_rest", *args],
                capture_output=True,
                text=True,
                timeout=90,
                cwd=self.root,
                env=nobody_environment(self.root),
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"still running after 90 s (it started?): {exc.stderr!r}") from exc


@pytest.fixture
def world(nobody_can_run: None) -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="sd-rest-permissions-"))
    root.chmod(0o755)
    try:
        yield World(root)
    finally:
        shutil.rmtree(root)


def assert_start_fails(world: World, args: list[str], expected: str) -> None:
    started = world.run(args)
    output = started.stdout + started.stderr
    assert "Traceback" not in output
    assert started.returncode != 0
    assert output.strip().splitlines() == [ERROR + expected]


def assert_check_fails(world: World, args: list[str], item: str, expected: str) -> None:
    checked = world.run([*args, "--check"])
    assert "Traceback" not in checked.stdout + checked.stderr
    assert checked.returncode == 1
    assert f"FAIL  {item:<21} {expected}" in checked.stdout.splitlines()


def assert_fails_alike(world: World, args: list[str], item: str, expected: str) -> None:
    """A start stops with `expected` as its one line, and --check fails `item` with it."""
    assert_start_fails(world, args, expected)
    assert_check_fails(world, args, item, expected)


def test_the_world_works_for_nobody(world: World) -> None:
    """The baseline every other test breaks one part of: nobody's start gets past every
    start-up check (and stops only at a port nobody may not take)."""
    started = world.run([*world.args(), "--port", "1"])
    output = started.stdout + started.stderr
    assert "Traceback" not in output
    refused = "cannot listen on 127.0.0.1:1: Permission denied"
    assert output.strip().splitlines() == [ERROR + refused]


# (option, its --check item, how the messages name it, the fix beside opening the folder).
# A checkpoint out of reach is not a warning, as a missing one is: every job of its endpoints
# would fail.
IN_A_CLOSED_FOLDER = [
    ("repository", "repository", "the Stable Diffusion repository", "pass --repository"),
    ("python", "interpreter", "the scripts' Python interpreter", "check --python"),
    *(
        (f"{model}-model", f"{model} model", f"{model} model checkpoint", f"pass --{model}-model")
        for model in ("text-to-image", "inpaint-image")
    ),
    ("cert", "certificate", "SSL certificate", "pass --cert"),
    ("key", "certificate", "SSL certificate key", "pass --key"),
    ("output", "output folder", "the output folder", "pass --output"),
]


@pytest.mark.parametrize(
    ("flag", "item", "words", "otherwise"),
    IN_A_CLOSED_FOLDER,
    ids=[row[0] for row in IN_A_CLOSED_FOLDER],
)
def test_in_a_folder_nobody_may_not_enter(
    world: World, flag: str, item: str, words: str, otherwise: str
) -> None:
    path = world.copy_into(world.locked, flag)
    expected = (
        f"{words} {path} is out of reach: {WHO} may not enter the folder {world.locked}; "
        f"fix: chmod a+x {world.locked}, or {otherwise}"
    )
    assert_fails_alike(world, world.args(**{flag: path}), item, expected)


def test_through_a_link_into_a_folder_nobody_may_not_enter(world: World) -> None:
    """The closed folder is the one the link leads into, not the link: `chmod a+x` on the
    link would change the venv it points to and leave the closed folder closed."""
    venv = world.locked / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy2(world.python, venv / "bin" / "python")
    link = world.root / "venv"
    link.symlink_to(venv)
    python = link / "bin" / "python"
    expected = (
        f"the scripts' Python interpreter {python} is out of reach: {WHO} may not enter the "
        f"folder {world.locked}; fix: chmod a+x {world.locked}, or check --python"
    )
    assert_fails_alike(world, world.args(python=python), "interpreter", expected)


def test_repository_nobody_may_not_read(world: World) -> None:
    world.repo.chmod(0o700)
    expected = (
        f"the Stable Diffusion repository {world.repo} is not readable by {WHO}; "
        f"fix: chown -R nobody {world.repo}, or pass --repository"
    )
    assert_fails_alike(world, world.args(), "repository", expected)


def test_a_script_nobody_may_not_read(world: World) -> None:
    (world.repo / "scripts" / "img2img.py").chmod(0o600)
    expected = (
        f"{world.repo}: scripts/img2img.py is not readable by {WHO}; "
        f"fix: chown -R nobody {world.repo}, or pass --repository"
    )
    assert_fails_alike(world, world.args(), "scripts", expected)


@pytest.mark.parametrize("model", ["text-to-image", "inpaint-image"])
def test_checkpoint_nobody_may_not_read(world: World, model: str) -> None:
    world.models[model].chmod(0o600)
    expected = (
        f"{model} model checkpoint {world.models[model]} is not readable by {WHO}; "
        f"fix: chown nobody {world.models[model]}, or pass --{model}-model"
    )
    assert_fails_alike(world, world.args(), f"{model} model", expected)


def test_certificate_nobody_may_not_read(world: World) -> None:
    world.cert.chmod(0o600)
    expected = (
        f"SSL certificate {world.cert} is not readable by {WHO}; "
        f"fix: chown nobody {world.cert}, or pass --cert"
    )
    assert_fails_alike(world, world.args(), "certificate", expected)


def test_output_folder_nobody_may_not_write(world: World) -> None:
    world.output.chmod(0o755)
    expected = (
        f"the output folder {world.output} is not writable by {WHO}; "
        f"fix: chown -R nobody {world.output}, or pass --output"
    )
    assert_fails_alike(world, world.args(), "output folder", expected)


def test_output_folder_nobody_may_not_make(world: World) -> None:
    """Not yet there, in a folder nobody may not write: a start and --check say the same.
    The fix gives nobody the output folder only, not the folder above it (that may be /)."""
    output = world.root / "new" / "output"
    expected = (
        f"the output folder {output} cannot be created: {world.root} is not writable by "
        f"{WHO}; fix: mkdir -p {output} && chown nobody {output}, or pass --output"
    )
    assert_fails_alike(world, world.args(output=output), "output folder", expected)
    assert not (world.root / "new").exists()


def test_output_folder_holding_a_folder_of_another_user(world: World) -> None:
    queue = world.folder("output/.queue", 0o700)
    expected = (
        f"the output folder {world.output} holds {queue}, which {WHO} may not change (made "
        f"by another user?); fix: chown -R nobody {world.output}, or pass --output"
    )
    assert_fails_alike(world, world.args(), "output folder", expected)


def test_job_index_nobody_may_neither_open_nor_replace(world: World) -> None:
    # A sticky folder (as /tmp is): nobody may not delete root's index to make it again.
    world.output.chmod(0o1777)
    index = world.output / ".index.sqlite3"
    index.write_bytes(b"")
    index.chmod(0o600)
    expected = (
        f"the job index {index} is not readable and writable by {WHO}, who may not replace "
        "it either; fix: delete it (the server makes it again from the job folders), "
        f"or chown nobody {index}"
    )
    assert_fails_alike(world, world.args(), "job index", expected)


def test_job_index_that_is_a_folder_nobody_may_not_move(world: World) -> None:
    # One that can be moved goes to the quarantine (test_index_repair.py); in a sticky folder
    # nobody may not move root's.
    world.output.chmod(0o1777)
    index = world.folder("output/.index.sqlite3", 0o755)
    expected = (
        f"the job index {index} is not a file, and {WHO} may not move it out of the way; "
        f"fix: rm -r {index} (the server makes it again from the job folders)"
    )
    assert_fails_alike(world, world.args(), "job index", expected)


def test_job_index_that_is_a_link_nobody_may_not_move(world: World) -> None:
    """A link to a file nobody may use is no index to the server, which never opens one
    through a link but moves the link away: in a sticky folder nobody may not move root's."""
    world.output.chmod(0o1777)
    usable = world.root / "elsewhere.sqlite3"
    usable.write_bytes(b"")
    usable.chmod(0o666)
    index = world.output / ".index.sqlite3"
    index.symlink_to(usable)
    expected = (
        f"the job index {index} is not a file, and {WHO} may not move it out of the way; "
        f"fix: rm -r {index} (the server makes it again from the job folders)"
    )
    assert_fails_alike(world, world.args(), "job index", expected)


def test_unfinished_job_nobody_may_not_read(world: World) -> None:
    """Deeper than the checks look: recovery itself stops with one line."""
    world.folder("output/.queue", 0o777)
    world.folder("output/text-to-image", 0o777)
    (world.output / ".queue" / f"text-to-image.{JOB_ID}").write_text("")
    job = world.folder(f"output/text-to-image/{JOB_ID}", 0o700)
    (job / "job.json").write_text("{}")
    expected = (
        f"cannot recover the unfinished jobs in the output folder {world.output}: "
        f"{job / 'job.json'}: {WHO} may not enter the folder {job}; "
        f"fix: chown -R nobody {world.output} (made by another user?), or pass --output"
    )
    assert_start_fails(world, world.args(), expected)
    deleting = world.run([*world.args(), "--delete-incomplete"])
    assert "Traceback" not in deleting.stdout + deleting.stderr
    assert deleting.returncode != 0
    # (after a warning: the damaged-looking job could not be moved to the quarantine either)
    assert deleting.stderr.strip().splitlines()[-1:] == [
        f"{ERROR}cannot delete the incomplete jobs in the output folder {world.output}: "
        f"{job}: {WHO} may not read it; "
        f"fix: chown -R nobody {world.output} (made by another user?), or pass --output"
    ]
