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


def user() -> str:
    """`user <name>`: the account whose permissions count (the effective one)."""
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


def closed_folder(path: Path) -> Path | None:
    """The first folder on the way to `path` that this process may not enter (search), or
    None. The way as written is tried first, then the one its links lead to."""
    ways = [path.absolute()]
    real = Path(os.path.realpath(path))
    if real != ways[0]:
        ways.append(real)
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
    name = user().split(" ", 1)[1]
    return f"chown {'-R ' if folder else ''}{name} {path}"


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
    return (
        f"cannot {doing} in the output folder {output}: {path}: {problem.reason}; "
        f"fix: {owner_fix(output)} (made by another user?), or pass --output"
    )
