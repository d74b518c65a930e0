"""Why this process cannot reach a path, in words with a fix.

The server runs as an ordinary user, often not the one who made its files: a bare EACCES on a
path says neither which folder is closed nor to whom. These name the folder on the way that
this user may not enter (following links, as the kernel does), or the file it may not read or
change, and the command that opens it. Start-up and `--check` (check.py) share them.
"""

from __future__ import annotations

import errno
import os
import pwd
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    reason: str  # "user nobody may not enter the folder /srv/locked"
    fix: str  # "chmod a+x /srv/locked"; empty when there is no command to give


def _name() -> str | int:
    """The account whose permissions count (the effective one): its name, or its uid when
    it has none (a container's user); chown takes either."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid


def user() -> str:
    """`user <name>` (or `uid <n>`): that account, as the messages name it."""
    name = _name()
    return f"uid {name}" if isinstance(name, int) else f"user {name}"


def closed_folder(path: Path) -> Path | None:
    """The first folder on the way to `path` that this process may not enter (search), or
    None. The way its links lead to is tried first: through a link into a closed folder the
    link itself only seems closed, and `chmod` on it would change its target. Then the way as
    written (realpath stops resolving at a folder it may not enter)."""
    ways = [Path(os.path.realpath(path))]
    written = path.absolute()
    if written != ways[0]:
        ways.append(written)
    for way in ways:
        for folder in reversed(way.parents):
            if not os.access(folder, os.X_OK):
                return folder
    return None


def _file_in_the_way(path: Path) -> Path | None:
    """The first thing on the way to `path` that is not a folder (ENOTDIR), or None."""
    for folder in reversed(path.absolute().parents):
        try:
            if not folder.is_dir():
                return folder
        except OSError:
            return None
    return None


def explain(path: Path, error: OSError) -> Problem:
    """Why looking up or opening `path` failed with `error`."""
    who = user()
    if error.errno in (errno.EACCES, errno.EPERM):
        folder = closed_folder(path)
        if folder is not None:
            return Problem(f"{who} may not enter the folder {folder}", f"chmod a+x {folder}")
        return Problem(f"{who} may not read it", f"let {who} read it: {readable_fix(path)}")
    if error.errno == errno.ELOOP:
        return Problem("its symbolic links form a loop", f"correct or remove the link {path}")
    if error.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return Problem(f"{blocker} is a file, not a folder", "")
    return Problem(error.strerror or str(error), "")


def readable_fix(path: Path, folder: bool = False) -> str:
    """The command that lets this user read `path` (a folder: everything in it): by its mode
    when this user owns it, else by giving it to this user."""
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = -1
    if owner == os.geteuid():
        return f"chmod -R u+rX {path}" if folder else f"chmod u+r {path}"
    return owner_fix(path, folder)


def owner_fix(path: Path, folder: bool = True) -> str:
    """Giving `path` (and, for a folder, everything in it) to this user."""
    return f"chown {'-R ' if folder else ''}{_name()} {path}"


def reach(path: Path) -> Problem | None:
    """None when `path` can be looked up, whether or not it exists; else why not."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return explain(path, exc)
    return None


def output_problem(output: Path, doing: str, error: OSError) -> str:
    """One line for a file of the output folder that start-up could not read or change:
    `doing` says what it was for ("recover the unfinished jobs")."""
    path = Path(error.filename) if error.filename else output
    problem = explain(path, error)
    if error.errno in (errno.EACCES, errno.EPERM):
        # Files of the output that this user may not change: most often made by another one.
        fix = f"{owner_fix(output)} (made by another user?)"
    else:
        # A read-only or failing disk, a loop of links ...: no owner to change.
        fix = problem.fix or "check the disk"
    return (
        f"cannot {doing} in the output folder {output}: {path}: {problem.reason}; "
        f"fix: {fix}, or pass --output"
    )
