"""The job index in process, on real files: pages in order with filters and places, what the
store's writers put, and what a start's reconciliation reads again (only what changed after a
stop in order; everything after a crash; a damaged file made again, whenever the damage is
found)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from sd_rest.state import indexfile, indexreconcile
from sd_rest.state import indexwriter as index_module
from sd_rest.state.events import JobEvents
from sd_rest.state.index import JobIndex
from sd_rest.state.indexreconcile import RETRY_SECONDS
from sd_rest.state.items import IndexUnavailable
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import Layout, parse_marker
from sd_rest.state.store import JobStore

from bench.jobfolders import make_job, tiny_png, write_job

ALL = list(Status)
ENDPOINTS = ["text-to-image", "image-to-image", "inpaint-image"]


def on_disk(output: Path, count: int) -> list[Job]:
    rng = random.Random(3)
    png = output.parent / "tiny.png"
    output.mkdir(parents=True, exist_ok=True)
    png.write_bytes(tiny_png())
    jobs = []
    for n in range(count):
        job = make_job(ENDPOINTS[n % 3], n, rng, finished=True)
        write_job(output, job, png)
        jobs.append(job)
    return jobs


def all_rows(index: JobIndex, statuses: list[Status] = ALL, endpoints: list[str] = ENDPOINTS):
    async def read() -> list:
        rows, after = [], None
        while True:
            got = await index.page(statuses, endpoints, after, 7)
            rows += got
            if len(got) < 7:
                return rows
            after = got[-1].place

    return asyncio.run(read())


def test_reconcile_builds_then_reads_only_what_changed(tmp_path: Path) -> None:
    output = tmp_path / "output"
    jobs = on_disk(output, 40)
    index = JobIndex(Layout(output))
    assert index.reconcile().result() == 40
    rows = all_rows(index)
    newest_first = sorted(jobs, key=lambda j: (j.created_at, j.endpoint, j.id), reverse=True)
    assert [(r.endpoint, r.id) for r in rows] == [(j.endpoint, j.id) for j in newest_first]
    item = json.loads(rows[0].item)
    assert item["id"] == newest_first[0].id and item["params"] == newest_first[0].params
    failed = all_rows(index, [Status.FAILED])
    assert {r.id for r in failed} == {j.id for j in jobs if j.status is Status.FAILED}
    assert {r.endpoint for r in all_rows(index, ALL, ["inpaint-image"])} == {"inpaint-image"}
    index.close()

    # Closed in order: a start reads nothing again, unless a sidecar changed or a folder went.
    changed = jobs[5]
    sidecar = output / changed.endpoint / changed.id / "job.json"
    doc = json.loads(sidecar.read_text())
    doc["error"] = "changed while the server was stopped"
    doc["status"] = "FAILED"
    sidecar.write_text(json.dumps(doc))
    os.utime(sidecar, ns=(1, 1))
    gone = jobs[6]
    os.rename(output / gone.endpoint / gone.id, tmp_path / "moved-away")
    index = JobIndex(Layout(output))
    assert index.reconcile().result() == 1
    rows = {r.id: r for r in all_rows(index)}
    assert gone.id not in rows and len(rows) == 39
    assert rows[changed.id].status is Status.FAILED
    assert "changed while" in json.loads(rows[changed.id].item)["error"]
    # Not closed (a crash): the next start reads every sidecar again.
    index._thread.shutdown(wait=True)
    index = JobIndex(Layout(output))
    assert index.reconcile().result() == 39
    index.close()


def test_the_store_keeps_it_and_a_damaged_file_is_made_again(tmp_path: Path) -> None:
    output = tmp_path / "output"
    jobs = on_disk(output, 5)

    async def scenario() -> None:
        store = JobStore(Layout(output), JobEvents())
        store.index.reconcile()
        loaded = await store.get(jobs[0].endpoint, jobs[0].id)
        assert loaded is not None
        store.forget(loaded.endpoint, loaded.id)
        rows = await store.index.page(ALL, ENDPOINTS, None, 100)
        assert loaded.id not in {r.id for r in rows} and len(rows) == 4
        # A sidecar found damaged when read is quarantined, and leaves the index.
        bad = jobs[1]
        (output / bad.endpoint / bad.id / "job.json").write_text("{not json")
        assert await store.get(bad.endpoint, bad.id) is None
        rows = await store.index.page(ALL, ENDPOINTS, None, 100)
        assert bad.id not in {r.id for r in rows} and len(rows) == 3
        await store.close()

    asyncio.run(scenario())
    (output / ".index.sqlite3").write_bytes(b"garbage" * 1000)
    index = JobIndex(Layout(output))
    index.reconcile().result()
    assert len(all_rows(index)) == 4  # the forgotten job's folder is still there
    index.close()


def test_changes_are_written_in_batches_yet_a_page_and_the_close_never_wait(
    tmp_path: Path, monkeypatch
) -> None:
    """With a write delay far beyond the test's time-out, a page still sees every change put
    before it (it wakes the waiting batch), and the close writes what is queued: the next
    server reads no sidecar again."""
    monkeypatch.setattr(index_module, "WRITE_DELAY", 3600.0)
    output = tmp_path / "output"
    jobs = on_disk(output, 30)
    index = JobIndex(Layout(output))
    for job in jobs[:20]:
        index.put(job)

    async def first_page() -> list:
        return await asyncio.wait_for(index.page(ALL, ENDPOINTS, None, 50), 20)

    assert {r.id for r in asyncio.run(first_page())} == {j.id for j in jobs[:20]}
    for job in jobs[20:]:
        index.put(job)
    shutil.rmtree(output / jobs[0].endpoint / jobs[0].id)  # as the store forgets a job
    index.remove(jobs[0].endpoint, jobs[0].id)
    closer = threading.Thread(target=index.close)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "the close waited for the batch's delay"

    again = JobIndex(Layout(output))
    assert again.reconcile().result() == 0  # closed in order, every row as its sidecar
    assert {r.id for r in all_rows(again)} == {j.id for j in jobs[1:]}
    again.close()


def damage_the_file(output: Path, name: str, last: bool = False) -> None:
    """Random bytes over a leaf page of the table or index `name` of a closed index (the one
    of its greatest keys when `last`)."""
    path = output / ".index.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = [
            n
            for (n,) in db.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path",
                (name,),
            )
        ]
    assert len(pages) >= 2
    with path.open("r+b") as file:
        file.seek((pages[-1 if last else 1] - 1) * size)
        file.write(random.Random(4).randbytes(size))


def quick_check(output: Path) -> str:
    with contextlib.closing(sqlite3.connect(output / ".index.sqlite3")) as db:
        return " ".join(row[0] for row in db.execute("PRAGMA quick_check"))


def test_damage_found_by_a_page_makes_it_again_and_the_page_is_answered(
    tmp_path: Path, monkeypatch
) -> None:
    """With the start's check off (as when it runs out of time), the damage is found by the
    first page that reads it: the file is made again and that page read from the new one."""
    output = tmp_path / "output"
    jobs = on_disk(output, 200)
    index = JobIndex(Layout(output))
    index.reconcile().result()
    index.close()
    damage_the_file(output, "jobs_newest")
    monkeypatch.setattr(indexfile, "CHECK_SECONDS", 0)
    index = JobIndex(Layout(output))
    assert index.reconcile().result() == 0  # closed in order: trusted as it is
    newest_first = sorted(jobs, key=lambda j: (j.created_at, j.endpoint, j.id), reverse=True)
    assert [r.id for r in all_rows(index)] == [j.id for j in newest_first]
    index.close()
    again = JobIndex(Layout(output))
    assert again.reconcile().result() == 0  # the remade file was closed in order
    assert len(all_rows(again)) == 200
    again.close()


def test_damage_found_by_a_write_makes_it_again(tmp_path: Path, monkeypatch) -> None:
    """A new job's row goes where the damage is: the file is made again there and then (it
    was retried forever, and every start trusted the damaged file)."""
    output = tmp_path / "output"
    jobs = on_disk(output, 200)
    index = JobIndex(Layout(output))
    index.reconcile().result()
    index.close()
    damage_the_file(output, "jobs_newest", last=True)
    assert quick_check(output) != "ok"
    monkeypatch.setattr(indexfile, "CHECK_SECONDS", 0)
    index = JobIndex(Layout(output))
    assert index.reconcile().result() == 0
    newest = make_job("text-to-image", 500, random.Random(8), finished=True)
    write_job(output, newest, output.parent / "tiny.png")
    index.put(newest)
    index.close()  # writes the row: no page was asked for
    assert quick_check(output) == "ok"
    again = JobIndex(Layout(output))
    assert again.reconcile().result() == 0  # closed in order after it was made again
    assert {r.id for r in all_rows(again)} == {j.id for j in [*jobs, newest]}
    again.close()


def test_an_item_changed_yet_still_json_is_found_by_its_crc(tmp_path: Path) -> None:
    output = tmp_path / "output"
    jobs = on_disk(output, 5)
    index = JobIndex(Layout(output))
    index.reconcile().result()
    index.close()
    path = output / ".index.sqlite3"
    data = path.read_bytes()
    prompt = jobs[3].params["prompt"].encode()  # a text-to-image job
    assert data.count(prompt) == 1
    path.write_bytes(data.replace(prompt, prompt.upper()))  # JSON still, but not what was put
    index = JobIndex(Layout(output))
    index.reconcile().result()
    items = {r.id: json.loads(r.item) for r in all_rows(index)}
    assert items[jobs[3].id]["params"]["prompt"] == jobs[3].params["prompt"]
    assert len(items) == 5
    index.close()


def test_names_that_end_in_a_newline_are_not_jobs(tmp_path: Path) -> None:
    """`^...$` also matched before a trailing newline: such a folder was taken for a job."""
    output = tmp_path / "output"
    jobs = on_disk(output, 2)
    folder = output / jobs[0].endpoint / jobs[0].id
    shutil.copytree(folder, folder.with_name(jobs[0].id + "\n"))
    shutil.rmtree(folder)
    index = JobIndex(Layout(output))
    assert index.reconcile().result() == 1
    assert [r.id for r in all_rows(index)] == [jobs[1].id]
    index.close()
    assert parse_marker(f"{jobs[1].endpoint}.{jobs[1].id}") == (jobs[1].endpoint, jobs[1].id)
    assert parse_marker(f"{jobs[1].endpoint}.{jobs[1].id}\n") is None


def test_a_sidecar_whose_text_is_no_utf8_is_left_out(tmp_path: Path) -> None:
    """A lone surrogate in its text (valid JSON, no UTF-8 for SQLite): the sidecar is not taken
    for a job (Job.from_sidecar), so the reconciliation lists every other job."""
    output = tmp_path / "output"
    jobs = on_disk(output, 12)
    bad = jobs[4]
    sidecar = output / bad.endpoint / bad.id / "job.json"
    doc = json.loads(sidecar.read_text())
    doc["params"]["prompt"] = "\ud800"
    sidecar.write_text(json.dumps(doc))  # as an escape: the file is valid JSON and UTF-8
    index = JobIndex(Layout(output))
    index.reconcile().result()
    assert {r.id for r in all_rows(index)} == {j.id for j in jobs if j is not bad}
    index.close()


def test_a_failure_that_is_not_sqlites_leaves_no_transaction_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure half way through the reconciliation that no sidecar can cause any more (it
    stands for a bug): its transaction was left open, the next page read the rows half
    written, and the next BEGIN was an SQLite error taken for damage (the file made again, and
    again). Now it is rolled back, and the next page reconciles first."""
    output = tmp_path / "output"
    jobs = on_disk(output, 12)
    bad = jobs[4]
    real_row_of = indexreconcile.row_of

    def failing_row_of(job: Job) -> indexreconcile.NewRow:
        if job.id == bad.id:
            raise RuntimeError("not SQLite's")
        return real_row_of(job)

    monkeypatch.setattr(indexreconcile, "row_of", failing_row_of)
    index = JobIndex(Layout(output))
    with pytest.raises(RuntimeError):
        index.reconcile().result()
    monkeypatch.setattr(indexreconcile, "row_of", real_row_of)
    assert {r.id for r in all_rows(index)} == {j.id for j in jobs}
    assert index.reconcile().result() == 0
    index.close()
    assert "damaged" not in caplog.text


def sqlite_error(kind: type[sqlite3.Error], message: str, code: int | None) -> sqlite3.Error:
    """An error as the sqlite3 module raises it: with its code (Python 3.11+) or without."""
    exc = kind(message)
    if code is not None:
        exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    return exc


def test_damage_is_told_from_the_disks_trouble_with_or_without_a_code() -> None:
    """Python 3.10's errors carry no code: a busy lock or a full disk was taken for damage,
    and the index deleted (another process's live journal with it)."""
    operational, corrupt = sqlite3.OperationalError, sqlite3.DatabaseError
    cases = [
        (operational, "database is locked", 5, False),
        (operational, "database or disk is full", 13, False),
        (operational, "attempt to write a readonly database", 8, False),
        (operational, "disk I/O error", 10 | (12 << 8), False),  # an extended code
        (corrupt, "database disk image is malformed", 11, True),
        (corrupt, "file is not a database", 26, True),
        (operational, "cannot start a transaction within a transaction", 1, True),
    ]
    for kind, message, code, damage in cases:
        for shown in (code, None):
            if shown is None and code == 1:
                continue  # SQLITE_ERROR: without its code, an OperationalError like the disk's
            exc = sqlite_error(kind, message, shown)
            assert indexfile.is_damage(exc) is damage, (message, shown)
    not_utf8 = sqlite3.OperationalError("Could not decode to UTF-8 column 'item' with text 'x'")
    assert indexfile.is_damage(not_utf8)
    assert indexfile.is_damage(indexfile.Damaged("a row"))
    assert not indexfile.is_damage(OSError("no space left on device"))


def test_real_errors_are_told_apart(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all" * 100)
    with (
        contextlib.closing(sqlite3.connect(garbage)) as db,
        pytest.raises(sqlite3.DatabaseError) as not_a_database,
    ):
        db.execute("SELECT * FROM sqlite_master").fetchall()
    assert indexfile.is_damage(not_a_database.value)
    good = tmp_path / "good.sqlite3"
    with contextlib.closing(sqlite3.connect(good, isolation_level=None)) as holder:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        with (
            contextlib.closing(sqlite3.connect(good, timeout=0)) as other,
            pytest.raises(sqlite3.OperationalError) as busy,
        ):
            other.execute("SELECT * FROM t").fetchall()
    assert not indexfile.is_damage(busy.value)
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("CREATE TABLE t (x TEXT)")
        db.execute("INSERT INTO t VALUES (CAST(x'ff' AS TEXT))")
        with pytest.raises(sqlite3.OperationalError) as not_utf8:
            db.execute("SELECT x FROM t").fetchall()
    assert indexfile.is_damage(not_utf8.value)


def test_an_index_busy_at_the_open_is_kept_not_made_again(tmp_path: Path) -> None:
    """Another process holds the file (SQLITE_BUSY) as the server opens it: every error at the
    open was taken for damage, and the good file deleted under its holder. Now: unavailable
    (a 503 with Retry-After), and the file kept."""
    output = tmp_path / "output"
    on_disk(output, 5)
    index = JobIndex(Layout(output))
    index.reconcile().result()
    index.close()
    path = output / ".index.sqlite3"
    inode = path.stat().st_ino
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        index = JobIndex(Layout(output))
        with pytest.raises(IndexUnavailable):
            index.reconcile().result()  # after SQLite's own wait for the lock (5 s)
        holder.execute("COMMIT")
    assert path.stat().st_ino == inode
    time.sleep(RETRY_SECONDS)  # not tried again before
    assert len(all_rows(index)) == 5
    index.close()
