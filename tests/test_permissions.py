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

    def args(self, **overrides: Path) -> list[str]:
        paths = {
            "repository": self.repo,
            "python": self.python,
            "text-to-image-model": self.models["text-to-image"],
            "inpaint-image-model": self.models["inpaint-image"],
            "cert": self.cert,
            "key": self.key,
            "output": self.output,
            **{name.replace("_", "-"): path for name, path in overrides.items()},
        }
        # The stub interpreter runs no script: a warm-up would only fail (and say so).
        args = ["--host", "127.0.0.1", "--port", "0", "--no-warm-start"]
        for flag, path in paths.items():
            args += [f"--{flag}", str(path)]
        return args

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


def test_the_world_works_for_nobody(world: World) -> None:
    """The baseline every other test breaks one part of: nobody's start gets past every
    start-up check (and stops only at a port nobody may not take)."""
    started = world.run([*world.args(), "--port", "1"])
    output = started.stdout + started.stderr
    assert "Traceback" not in output
    refused = "cannot listen on 127.0.0.1:1: Permission denied"
    assert output.strip().splitlines() == [ERROR + refused]


def test_repository_in_a_folder_nobody_may_not_enter(world: World) -> None:
    repo = fork_tree(world.locked / "repo")
    expected = (
        f"the Stable Diffusion repository {repo} is out of reach: {WHO} may not enter the "
        f"folder {world.locked}; fix: chmod a+x {world.locked}, or pass --repository"
    )
    assert_start_fails(world, world.args(repository=repo), expected)
    assert_check_fails(world, world.args(repository=repo), "repository", expected)


def test_repository_nobody_may_not_read(world: World) -> None:
    world.repo.chmod(0o700)
    expected = (
        f"the Stable Diffusion repository {world.repo} is not readable by {WHO}; "
        f"fix: chown -R nobody {world.repo}, or pass --repository"
    )
    assert_start_fails(world, world.args(), expected)
    assert_check_fails(world, world.args(), "repository", expected)


def test_a_script_nobody_may_not_read(world: World) -> None:
    (world.repo / "scripts" / "img2img.py").chmod(0o600)
    expected = (
        f"{world.repo}: scripts/img2img.py is not readable by {WHO}; "
        f"fix: chown -R nobody {world.repo}, or pass --repository"
    )
    assert_start_fails(world, world.args(), expected)
    assert_check_fails(world, world.args(), "scripts", expected)


def test_interpreter_in_a_folder_nobody_may_not_enter(world: World) -> None:
    python = world.locked / "python"
    shutil.copy2(world.python, python)
    expected = (
        f"the scripts' Python interpreter {python} is out of reach: {WHO} may not enter the "
        f"folder {world.locked}; fix: chmod a+x {world.locked}, or check --python"
    )
    assert_start_fails(world, world.args(python=python), expected)
    assert_check_fails(world, world.args(python=python), "interpreter", expected)


@pytest.mark.parametrize("model", ["text-to-image", "inpaint-image"])
def test_checkpoint_in_a_folder_nobody_may_not_enter(world: World, model: str) -> None:
    checkpoint = shutil.copy2(world.models[model], world.locked / "model.ckpt")
    args = world.args(**{f"{model}-model": Path(checkpoint)})
    expected = (
        f"{model} model checkpoint {checkpoint} is out of reach: {WHO} may not enter the "
        f"folder {world.locked}; fix: chmod a+x {world.locked}, or pass --{model}-model"
    )
    # Not a warning, as a missing checkpoint is: every job of its endpoints would fail.
    assert_start_fails(world, args, expected)
    assert_check_fails(world, args, f"{model} model", expected)


@pytest.mark.parametrize("model", ["text-to-image", "inpaint-image"])
def test_checkpoint_nobody_may_not_read(world: World, model: str) -> None:
    world.models[model].chmod(0o600)
    expected = (
        f"{model} model checkpoint {world.models[model]} is not readable by {WHO}; "
        f"fix: chown nobody {world.models[model]}, or pass --{model}-model"
    )
    assert_start_fails(world, world.args(), expected)
    assert_check_fails(world, world.args(), f"{model} model", expected)


def test_certificate_nobody_may_not_read(world: World) -> None:
    world.cert.chmod(0o600)
    expected = (
        f"SSL certificate {world.cert} is not readable: Permission denied; "
        f"fix: let {WHO} read it: chown nobody {world.cert}, or pass --cert"
    )
    assert_start_fails(world, world.args(), expected)
    assert_check_fails(world, world.args(), "certificate", expected)


def test_key_in_a_folder_nobody_may_not_enter(world: World) -> None:
    key = Path(shutil.copy2(world.key, world.locked / "key.pem"))
    expected = (
        f"SSL certificate key {key} is out of reach: {WHO} may not enter the folder "
        f"{world.locked}; fix: chmod a+x {world.locked}, or pass --key"
    )
    assert_start_fails(world, world.args(key=key), expected)
    assert_check_fails(world, world.args(key=key), "certificate", expected)


def test_key_that_is_a_loop_of_links(world: World) -> None:
    key = world.root / "loop.pem"
    key.symlink_to(world.root / "loop2.pem")
    (world.root / "loop2.pem").symlink_to(key)
    expected = (
        f"SSL certificate key {key} is out of reach: its symbolic links form a loop; "
        f"fix: correct or remove the link {key}, or pass --key"
    )
    assert_start_fails(world, world.args(key=key), expected)
    assert_check_fails(world, world.args(key=key), "certificate", expected)


def test_output_folder_in_a_folder_nobody_may_not_enter(world: World) -> None:
    output = world.locked / "output"
    expected = (
        f"the output folder {output} is out of reach: {WHO} may not enter the folder "
        f"{world.locked}; fix: chmod a+x {world.locked}, or pass --output"
    )
    assert_start_fails(world, world.args(output=output), expected)
    assert_check_fails(world, world.args(output=output), "output folder", expected)


def test_output_folder_under_a_file(world: World) -> None:
    output = world.cert / "output"
    expected = (
        f"the output folder {output} is out of reach: {world.cert} is a file, not a folder; "
        "fix: pass --output"
    )
    assert_start_fails(world, world.args(output=output), expected)
    assert_check_fails(world, world.args(output=output), "output folder", expected)


def test_output_folder_holding_a_folder_of_another_user(world: World) -> None:
    queue = world.folder("output/.queue", 0o700)
    expected = (
        f"the output folder {world.output} holds {queue}, which {WHO} may not change (made "
        f"by another user?); fix: chown -R nobody {world.output}, or pass --output"
    )
    assert_start_fails(world, world.args(), expected)
    assert_check_fails(world, world.args(), "output folder", expected)


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
    assert_start_fails(world, world.args(), expected)
    assert_check_fails(world, world.args(), "job index", expected)


def test_job_index_that_is_a_folder_nobody_may_not_move(world: World) -> None:
    # One that can be moved goes to the quarantine (test_index_repair.py); in a sticky folder
    # nobody may not move root's.
    world.output.chmod(0o1777)
    index = world.folder("output/.index.sqlite3", 0o755)
    expected = (
        f"the job index {index} is not a file, and {WHO} may not move it out of the way; "
        f"fix: rm -r {index} (the server makes it again from the job folders)"
    )
    assert_start_fails(world, world.args(), expected)
    assert_check_fails(world, world.args(), "job index", expected)


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
