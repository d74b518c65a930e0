"""Where an image came from, beyond its job: the checkpoint's SHA-256 and the fork's commit.

Both are slow to learn (hashing a 4 GB checkpoint takes seconds; the commit needs `git`), so
they are learnt in a background thread (started with the server, or at the first image that
asks) and never waited for: an image published before its checkpoint's hash is known simply
goes without it. A checkpoint is hashed once per file: the digest is cached by path, size and
modification time, in memory and in `<output>/.checkpoints.json`, so a restart does not read
the checkpoints again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from sd_rest.state.files import write_atomic

log = logging.getLogger(__name__)

CACHE_VERSION: Final = 1
CHUNK_BYTES: Final = 8 * 1024**2
SOURCE_COMMIT_FILE: Final = ".source-commit"  # for a fork installed without its git history
_GIT_TIMEOUT: Final = 10.0
_HEX: Final = frozenset("0123456789abcdef")

# (path, size, mtime_ns): a checkpoint file as it is now; its hash is valid while this holds.
FileKey = tuple[str, int, int]


def file_key(path: Path) -> FileKey | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _is_commit(text: str) -> bool:
    return len(text) == 40 and set(text) <= _HEX


def read_fork_commit(repository: Path) -> str | None:
    """The commit the fork's checkout is at: `.source-commit` when present (an archive carries
    no history), else `git rev-parse HEAD`, but only when the repository is the top of its
    own work tree (the bundled simulator lives inside sd-rest's checkout: that commit is not
    the fork's). None when neither says."""
    marker = repository / SOURCE_COMMIT_FILE
    try:
        text = marker.read_text(encoding="utf-8").strip().lower()
    except (OSError, UnicodeDecodeError):
        text = ""
    if _is_commit(text):
        return text
    git = shutil.which("git")
    if git is None or not (repository / ".git").exists():
        return None
    try:
        done = subprocess.run(
            [git, "-C", str(repository), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    if len(lines) != 2 or not _is_commit(lines[1].lower()):
        return None
    if Path(lines[0]).resolve() != repository.resolve():
        return None
    return lines[1].lower()


class Provenance:
    """The checkpoints' digests and the fork's commit, learnt in the background. Thread-safe:
    the publisher asks from its worker threads."""

    def __init__(self, cache_file: Path, repository: Path) -> None:
        self.cache_file = cache_file
        self.repository = repository
        self._lock = threading.Lock()
        self._digests: dict[str, tuple[int, int, str]] = self._load()  # path -> size, mtime, sha
        self._pending: list[Path] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._commit: str | None = None
        self._commit_read = False

    # --- asking (never blocks on hashing) -------------------------------------------------

    def checkpoint_sha256(self, path: Path) -> str | None:
        """The file's SHA-256 if it is known for the file as it is now; otherwise None, and
        the file is queued to be hashed in the background."""
        key = file_key(path)
        if key is None:
            return None
        with self._lock:
            known = self._digests.get(key[0])
            if known is not None and known[:2] == key[1:]:
                return known[2]
        self._queue([path])
        return None

    def sha256_now(self, path: Path) -> str | None:
        """Blocking (call it in a thread): the file's SHA-256, waiting for the background
        thread to hash it if it is not known yet; None when it cannot be read, or hashing is
        stopped. A remote job waits for it: its queue names the checkpoint by its digest."""
        known = self.checkpoint_sha256(path)
        if known is None and file_key(path) is not None:
            self.wait()
            with self._lock:
                key = file_key(path)
                found = self._digests.get(str(path)) if key is not None else None
                if key is not None and found is not None and found[:2] == key[1:]:
                    known = found[2]
        return known

    def fork_commit(self) -> str | None:
        """None until the background thread has read it (or when nothing says)."""
        return self._commit

    # --- learning -------------------------------------------------------------------------

    def start(self, checkpoints: Iterable[Path]) -> None:
        """Learn the fork's commit and hash the checkpoints not known yet, in the background."""
        self._queue([path for path in checkpoints if self.checkpoint_sha256(path) is None])

    def close(self) -> None:
        """Stop hashing (at the next chunk): the server is stopping."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background work (tests); True when it is done."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _queue(self, paths: list[Path]) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            for path in paths:
                if path not in self._pending:
                    self._pending.append(path)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="sd-rest-provenance", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        if not self._commit_read:
            self._commit = read_fork_commit(self.repository)
            self._commit_read = True
        while True:
            with self._lock:
                if not self._pending or self._stop.is_set():
                    self._thread = None
                    return
                path = self._pending[0]
            try:
                self._hash(path)
            except Exception:  # a background nicety must never take anything down
                log.exception("hashing the checkpoint %s failed", path)
            with self._lock:
                self._pending.remove(path)

    def _hash(self, path: Path) -> None:
        before = file_key(path)
        if before is None:
            return
        with self._lock:
            known = self._digests.get(before[0])
            if known is not None and known[:2] == before[1:]:
                return  # asked twice before the first hash was done
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as file:
                while chunk := file.read(CHUNK_BYTES):
                    if self._stop.is_set():
                        return
                    digest.update(chunk)
        except OSError as exc:
            log.warning("could not hash the checkpoint %s: %s", path, exc)
            return
        if file_key(path) != before:
            return  # changed while it was read: hashed again when next asked
        with self._lock:
            self._digests[before[0]] = (before[1], before[2], digest.hexdigest())
            snapshot = dict(self._digests)
        self._save(snapshot)

    # --- the cache file ---------------------------------------------------------------------

    def _load(self) -> dict[str, tuple[int, int, str]]:
        try:
            doc = json.loads(self.cache_file.read_bytes())
            if doc.get("version") != CACHE_VERSION:
                return {}
            return {
                str(path): (int(entry["size"]), int(entry["mtimeNs"]), str(entry["sha256"]))
                for path, entry in doc["files"].items()
                if len(str(entry["sha256"])) == 64
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring the checkpoint hash cache %s: %s", self.cache_file, exc)
            return {}

    def _save(self, digests: dict[str, tuple[int, int, str]]) -> None:
        doc = {
            "version": CACHE_VERSION,
            "files": {
                path: {"size": size, "mtimeNs": mtime, "sha256": sha}
                for path, (size, mtime, sha) in sorted(digests.items())
            },
        }
        try:
            write_atomic(self.cache_file, json.dumps(doc, indent=1).encode())
        except OSError as exc:  # a full disk: the digest stays known in memory
            log.warning("could not save the checkpoint hash cache %s: %s", self.cache_file, exc)


_INSTANCES: dict[tuple[Path, Path], Provenance] = {}
_INSTANCES_LOCK = threading.Lock()


def provenance_for(
    output: Path, repository: Path, cache_file: Path | None = None
) -> Provenance:
    """The one Provenance of a server's output folder and repository, shared by the manager
    (which starts it with the server) and every run (which asks it at each image). Its cache
    is `<output>/.checkpoints.json` unless `cache_file` says (a worker host's output is a
    scratch folder cleared at each start: its cache lives beside it)."""
    key = (output, repository)
    with _INSTANCES_LOCK:
        found = _INSTANCES.get(key)
        if found is None or found._stop.is_set():
            cache = cache_file or output / ".checkpoints.json"
            found = _INSTANCES[key] = Provenance(cache, repository)
        return found
