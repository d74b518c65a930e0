"""The job index's file (`<output>/.index.sqlite3`, index.py): opening it with a check of what
is there, reading a page of its rows, telling damage from trouble with the disk, and clearing
it away to make it again.

Damage SQLite does not see on opening is looked for at each start (`PRAGMA quick_check`,
bounded in time), and each item read carries a CRC-32 of its text: a changed byte anywhere in
it is found the first time the item is read. What is in the file's place and is no plain file
(a folder, a link) is moved to the quarantine; the file itself is derived data, deleted when
it is damaged and made again from the sidecars.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import zlib
from pathlib import Path
from typing import Any, Final

from sd_rest.endpoints import ENDPOINTS
from sd_rest.state.items import Place, Row
from sd_rest.state.jobs import Status
from sd_rest.state.layout import Layout
from sd_rest.state.quarantine import plain_file_or_nothing

log = logging.getLogger(__name__)

# 3: rows carry a CRC-32 of their item (issue 17). An index of another schema is made again.
SCHEMA: Final = "3"
# The start's check of the file stops after this long (then the file is trusted: damage it
# did not reach is still found when read). quick_check reads ~1 GB/s; 0 skips it.
CHECK_SECONDS: Final = 2.0
TABLES: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    endpoint TEXT NOT NULL,
    id TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    mtime INTEGER NOT NULL,
    item TEXT NOT NULL,
    crc INTEGER NOT NULL,
    PRIMARY KEY (endpoint, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_newest ON jobs (created, endpoint, id);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created, endpoint, id);
"""
# Primary result codes that say the disk or the system is in trouble, not the file: the index
# is not made again for these (it would not help), the request is answered 503.
_NOT_DAMAGE: Final = frozenset(
    {
        3,  # SQLITE_PERM
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        8,  # SQLITE_READONLY
        9,  # SQLITE_INTERRUPT
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
    }
)


# How the sqlite3 module says a stored text is not UTF-8 (an OperationalError with no code).
_NOT_UTF8: Final = "Could not decode to UTF-8"


class Damaged(Exception):
    """A row of the index is not what was written (its item fails its CRC, a column is off)."""


def crc(item: str) -> int:
    return zlib.crc32(item.encode())


def is_damage(exc: BaseException) -> bool:
    """Whether an error reading or writing the index says the file is damaged. SQLite's own
    errors carry their code (Python 3.11+). Without one (Python 3.10, or the sqlite3 module's
    own errors) the class tells: the disk's and the locks' troubles (busy, full, read-only,
    I/O) come as OperationalError, a corrupt file or one that is no database as DatabaseError
    itself; of the OperationalErrors only the module's text that is not UTF-8 is damage."""
    if isinstance(exc, Damaged):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF not in _NOT_DAMAGE
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).startswith(_NOT_UTF8)
    return True


def open_index(layout: Layout) -> tuple[sqlite3.Connection, bool]:
    """The open file with its tables, marked as lagging the sidecars until `mark_clean`; and
    whether the last server closed it in order. Raises sqlite3.DatabaseError for a file that
    is damaged or not an index (`delete_index`, then open again) and when the disk refuses
    (`is_damage` tells which), OSError when the way to it cannot be cleared."""
    path = layout.index_file
    layout.output.mkdir(parents=True, exist_ok=True)
    for file in layout.index_files:
        _clear_the_way(layout, file)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # A commit reaches the disk at the next checkpoint: the index is derived data, and
        # the clean flag (below) makes the next start read every sidecar after a crash.
        db.execute("PRAGMA synchronous=NORMAL")
        _quick_check(db, path)
        meta = dict(_meta(db))
        if meta.get("schema") not in (None, SCHEMA):
            db.executescript("DROP TABLE IF EXISTS jobs; DROP TABLE IF EXISTS meta;")
            meta = {}
        db.executescript(TABLES)
        # From now until the close this file may lag the sidecars: say so, durably.
        set_meta(db, {"schema": SCHEMA, "clean": "0"}, durable=True)
    except BaseException:
        db.close()
        raise
    return db, meta.get("clean") == "1"


def mark_clean(db: sqlite3.Connection) -> None:
    """At the close, every change written: the next start may trust the rows."""
    set_meta(db, {"clean": "1"}, durable=True)


def delete_index(layout: Layout) -> None:
    """The file and its journal gone (what is no plain file moved to the quarantine), to be
    made again. Raises OSError when something cannot be cleared away."""
    for path in layout.index_files:
        _clear_the_way(layout, path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clear_the_way(layout: Layout, path: Path) -> None:
    """SQLite would fail on a folder and follow a link: anything there but a plain file goes."""
    plain_file_or_nothing(
        layout, path, "the job index's place holds something that is not a plain file"
    )


def _quick_check(db: sqlite3.Connection, path: os.PathLike[str]) -> None:
    """Raise sqlite3.DatabaseError when the file's pages are not well formed. Stopped (from
    another thread: the check is one long SQLite step) after CHECK_SECONDS."""
    if CHECK_SECONDS <= 0:
        return
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        db.interrupt()

    timer = threading.Timer(CHECK_SECONDS, stop)
    timer.start()
    try:
        result = db.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.OperationalError:
        if not stopped.is_set():
            raise
        log.info("the check of %s took over %g s: the file is trusted", path, CHECK_SECONDS)
        return
    finally:
        timer.cancel()
        timer.join()
    if result != [("ok",)]:
        raise sqlite3.DatabaseError(" ".join(str(row[0]) for row in result).replace("\n", " "))


def read_page(
    db: sqlite3.Connection,
    statuses: list[str],
    endpoints: list[str],
    after: Place | None,
    limit: int,
) -> list[Row]:
    """Up to `limit` rows with one of `statuses` and `endpoints`, newest first, from just
    after `after`; Damaged for a row that is not as it was written."""
    # One status: its index gives the rows in order. Otherwise the newest-first index is
    # walked and the rows filtered (`+column` keeps SQLite from choosing an index on that
    # column and sorting every matching row for each page).
    where: list[str] = []
    args: list[Any] = []
    if len(statuses) < len(Status):
        column = "status" if len(statuses) == 1 else "+status"
        where.append(f"{column} IN ({','.join('?' * len(statuses))})")
        args.extend(statuses)
    if len(endpoints) < len(ENDPOINTS):
        where.append(f"+endpoint IN ({','.join('?' * len(endpoints))})")
        args.extend(endpoints)
    if after is not None:
        where.append("(created, endpoint, id) < (?, ?, ?)")
        args.extend(after)
    sql = (
        "SELECT created, endpoint, id, status, item, crc FROM jobs"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY created DESC, endpoint DESC, id DESC LIMIT ?"
    )
    return [_row(*row) for row in db.execute(sql, [*args, limit]).fetchall()]


def _row(created: Any, endpoint: Any, id_: Any, status: Any, item: Any, crc_: Any) -> Row:
    """A row read, as written, or Damaged."""
    if not (isinstance(item, str) and crc(item) == crc_):
        raise Damaged(f"the item of {endpoint}/{id_} is not as it was written")
    if not (isinstance(created, float) and endpoint in ENDPOINTS and isinstance(id_, str)):
        raise Damaged(f"a row's place is not as it was written ({created!r}, {endpoint!r})")
    try:
        return Row(created, endpoint, id_, Status(status), item)
    except (ValueError, TypeError):
        raise Damaged(f"the status of {endpoint}/{id_} is not one: {status!r}") from None


def _meta(db: sqlite3.Connection) -> list[tuple[str, str]]:
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
    return list(db.execute("SELECT key, value FROM meta")) if exists else []


def set_meta(db: sqlite3.Connection, values: dict[str, str], durable: bool) -> None:
    if durable:
        db.execute("PRAGMA synchronous=FULL")
    db.execute("BEGIN")
    db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())
    db.execute("COMMIT")
    if durable:
        db.execute("PRAGMA synchronous=NORMAL")
