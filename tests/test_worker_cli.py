"""`stable-diffusion-rest-api worker`'s command line: its help, the one-line errors that stop a
start (never a traceback), and --check. Real processes against a real redis-server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sd_rest.cluster.broker import BROKER_ENV

from helpers import FAST_SIMULATOR, free_port

PROG = "stable-diffusion-rest-api worker: error: "
FLAGS = [
    "--broker", "--repository", "--python", "--text-to-image-model", "--inpaint-image-model",
    "--runner", "--worker-max-jobs", "--worker-idle", "--worker-timeout", "--concurrency",
    "--demo", "--check", "--heartbeat-timeout",
]  # fmt: skip


def worker(
    tmp_path: Path, *args: str, prelude: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m sd_rest worker ...` to its end; `prelude` runs first (in the same process)."""
    start = ["-m", "sd_rest"]
    if prelude:
        run = "import runpy; runpy.run_module('sd_rest', run_name='__main__', alter_sys=True)"
        start = ["-c", f"{prelude}; {run}"]
    full_env = {**os.environ, **FAST_SIMULATOR, "SD_REST_WORKER_DIR": str(tmp_path / "w")}
    full_env.pop(BROKER_ENV, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *start, "worker", *args],
        capture_output=True, text=True, timeout=60, env=full_env, cwd=tmp_path,
    )  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error a start stopped with: exit status 1, one line on stderr, no traceback."""
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(PROG), lines
    return lines[0][len(PROG) :]


def test_help_lists_every_flag(tmp_path: Path) -> None:
    done = worker(tmp_path, "--help")
    assert done.returncode == 0
    for flag in FLAGS:
        assert f"\n    {flag}" in done.stdout or f", {flag}" in done.stdout, flag
    assert "SD_REST_WORKER_DIR" in done.stdout and BROKER_ENV in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) < 160


def test_the_broker_is_required(tmp_path: Path) -> None:
    assert one_line_error(worker(tmp_path, "--demo")).startswith("--broker is required")


def test_a_url_that_is_no_redis_one(tmp_path: Path) -> None:
    message = one_line_error(worker(tmp_path, "--demo", "--broker", "http://x:1"))
    assert "redis:// or rediss://" in message


def test_a_wrong_password(tmp_path: Path, redis_url: str) -> None:
    wrong = redis_url.replace(":s3cret-test-pass@", ":wrong@")
    message = one_line_error(worker(tmp_path, "--demo", "--broker", wrong))
    assert "refused the password" in message and "wrong" not in message


def test_the_broker_url_from_the_environment(tmp_path: Path, redis_url: str) -> None:
    wrong = redis_url.replace(":s3cret-test-pass@", ":wrong@")
    message = one_line_error(worker(tmp_path, "--demo", env={BROKER_ENV: wrong}))
    assert "refused the password" in message


def test_an_unreachable_redis(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # a closed port
    message = one_line_error(worker(tmp_path, "--demo", "--broker", url))
    assert message.startswith(f"cannot reach Redis at {url}")


def test_a_missing_repository(tmp_path: Path, redis_url: str) -> None:
    done = worker(tmp_path, "--broker", redis_url, "--repository", str(tmp_path / "nowhere"))
    assert "Stable Diffusion repository not found" in one_line_error(done)


def test_no_checkpoint_at_all(tmp_path: Path, redis_url: str) -> None:
    done = worker(
        tmp_path, "--demo", "--broker", redis_url,
        "--text-to-image-model", "none.ckpt", "--inpaint-image-model", "none2.ckpt",
    )  # fmt: skip
    assert one_line_error(done).startswith("no checkpoint found")


def test_the_cluster_extra_missing(tmp_path: Path, redis_url: str) -> None:
    done = worker(
        tmp_path, "--demo", "--broker", redis_url,
        prelude="import sys; sys.modules['dramatiq'] = None",
    )  # fmt: skip
    assert "pip install 'sd-rest[cluster]'" in one_line_error(done)


def test_check_passes_in_demo_mode(tmp_path: Path, redis_url: str) -> None:
    done = worker(tmp_path, "--demo", "--check", "--broker", redis_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "  ok  broker" in done.stdout and "***" in done.stdout
    assert "s3cret" not in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("ready")


@pytest.mark.parametrize("problem", ["password", "repository"])
def test_check_fails_saying_what(tmp_path: Path, redis_url: str, problem: str) -> None:
    args = ["--check", "--broker", redis_url]
    if problem == "password":
        args = ["--demo", "--check", "--broker", redis_url.replace("s3cret-test-pass", "no")]
    else:
        args += ["--repository", str(tmp_path / "nowhere")]
    done = worker(tmp_path, *args)
    assert done.returncode == 1, done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    item = "broker" if problem == "password" else "repository"
    assert failed and failed[0].split()[1] == item, done.stdout
    assert "Traceback" not in done.stderr


def test_the_scratch_folder_is_cleared_and_dead_ones_removed(tmp_path: Path) -> None:
    from sd_rest.workerhost.folders import scratch_folder

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in (str(gone.pid), str(os.getpid()), "12345678", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "left.png").write_bytes(b"x")
    mine = scratch_folder(tmp_path, 12345678)
    assert mine == tmp_path / "12345678" and list(mine.iterdir()) == []  # cleared
    assert not (tmp_path / str(gone.pid)).exists()  # its process is gone
    assert (tmp_path / str(os.getpid()) / "left.png").exists()  # a live process's
    assert (tmp_path / "notes" / "left.png").exists()  # not a scratch folder


# --- signals: at every stage of a start, and twice ---------------------------------------


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _started(tmp_path: Path, redis_url: str, *args: str, env: dict[str, str] | None = None):
    from clusterjobs import WorkerHost

    return WorkerHost(redis_url, tmp_path / "dir", list(args), env or {})


def test_sigterm_while_hashing_the_checkpoints_stops_cleanly(
    tmp_path: Path, redis_url: str
) -> None:
    """A first start reads a big checkpoint to hash it: SIGTERM then stops the start, in a
    line, exit 0, the scratch folder gone, no traceback."""
    from helpers import wait_until

    big = tmp_path / "big.ckpt"
    with open(big, "wb") as file:
        file.truncate(16 * 1024**3)  # sparse: 16 GB to read, none to store
    host = _started(tmp_path, redis_url, "--text-to-image-model", str(big))
    host.start()
    try:
        wait_until(lambda: "hashing" in host.log() or host._exited(), "the hashing to start")
        assert host.stop(signal.SIGTERM) == 0, host.log()
    finally:
        host.end()
    said = host.log()
    assert "stopped by SIGTERM before taking any job" in said and "Traceback" not in said
    assert host.process is not None
    assert not (tmp_path / "dir" / str(host.process.pid)).exists()


def test_sigterm_while_the_resident_worker_warms_up(tmp_path: Path, redis_url: str) -> None:
    """The host serves while its resident worker loads the model (60 s here): SIGTERM stops
    it cleanly, the warming worker with it, the record deleted."""
    import redis

    from helpers import wait_gone

    client = redis.Redis.from_url(redis_url)
    host = _started(tmp_path, redis_url, env={"SD_SIM_LOAD_SECONDS": "60"})
    host.start(client)
    try:
        assert host.process is not None
        warming = _children(host.process.pid)
        assert warming, host.log()
        assert host.stop(signal.SIGTERM) == 0, host.log()
    finally:
        host.end()
    wait_gone(warming)
    assert host.record(client) is None and "Traceback" not in host.log()


def test_a_second_sigint_while_stopping_exits_at_once(tmp_path: Path, redis_url: str) -> None:
    """The stop waits for a script that cannot end (stopped, here): a second SIGINT exits at
    once, with one line, status 130; the script goes with the host (its pty closes)."""
    import redis

    from clusterjobs import TEXT_TO_IMAGE, job_message, submit
    from helpers import script_pids, wait_gone, wait_until

    client = redis.Redis.from_url(redis_url)
    argv_log = tmp_path / "argv.jsonl"
    host = _started(
        tmp_path, redis_url, "--runner", "process",
        env={"SD_SIM_STEP_SECONDS": "0.05", "SD_SIM_ARGV_LOG": str(argv_log)},
    )  # fmt: skip
    host.start(client)
    message = job_message("text-to-image", {**TEXT_TO_IMAGE, "iterations": 20})
    pids: list[int] = []
    try:
        submit(client, redis_url, message)
        pids = wait_until(lambda: script_pids(argv_log, f"/x/{message.id}"), "the script")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # it cannot end when asked
        assert host.process is not None
        host.process.send_signal(signal.SIGINT)
        wait_until(lambda: "stopping: the running jobs" in host.log(), "the stop to begin")
        host.process.send_signal(signal.SIGINT)
        assert host.process.wait(10) == 130
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        host.end()
    said = host.log().splitlines()
    last = [line for line in said if "again while stopping" in line]
    assert last == [said[-1]] and "Traceback" not in host.log()
    assert last[0].startswith("stable-diffusion-rest-api worker: SIGINT again while stopping")
    wait_gone(pids)


def test_worker_max_jobs_and_worker_idle_reach_the_resident_workers(
    tmp_path: Path, redis_url: str
) -> None:
    """--worker-max-jobs 1: each job runs in a resident worker of its own (the script's pid
    changes); --worker-idle 1: once idle, the last one leaves (none is left on the host)."""
    import redis

    from clusterjobs import TEXT_TO_IMAGE, job_message, submit, wait_end
    from helpers import script_pids, wait_until

    client = redis.Redis.from_url(redis_url)
    argv_log = tmp_path / "argv.jsonl"
    host = _started(
        tmp_path, redis_url, "--worker-max-jobs", "1", "--worker-idle", "1",
        env={"SD_SIM_ARGV_LOG": str(argv_log)},
    )  # fmt: skip
    host.start(client)
    try:
        ran = []
        for _ in range(2):
            message = job_message("text-to-image", TEXT_TO_IMAGE)
            submit(client, redis_url, message)
            wait_end(client, message)
            ran += script_pids(argv_log, f"/x/{message.id}")
        assert len(ran) == 2 and ran[0] != ran[1], host.log()
        assert host.process is not None
        pid = host.process.pid
        wait_until(lambda: not _children(pid), "the idle resident worker to leave", 30)
    finally:
        host.end()
    assert "it has served 1 jobs" in host.log()
