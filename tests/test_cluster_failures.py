"""The cluster when things go wrong: a real redis-server, a real API node (`--broker`) and real
worker hosts (`python -m sd_rest worker --demo`), each in a process group of its own, killed,
stopped and restarted as machines are. Every finished job is checked whole: each image served,
once, seeded by the README's rule, and made again byte for byte by running the script by hand.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clusterhosts import WorkerHost, host_running, stop_all, wait_hosts, wait_status
from helpers import DEMO_MODELS, Server, check_finished_job, read_jsonl, wait_until
from redisserver import RedisServer
from redisserver import skip_reason as redis_skip_reason

HEARTBEAT = "2"  # seconds: a dead host's job moves after about this long
SLOW = {"SD_SIM_STEP_SECONDS": "0.08"}  # an image every ~0.5 s: time to act mid-job
FINAL = {"COMPLETE", "FAILED", "CANCELED"}


@pytest.fixture
def redis_here(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: these tests stop and restart it."""
    reason = redis_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[..., WorkerHost]]:
    started: list[WorkerHost] = []

    def start(broker: str, args: list[str] | None = None, env: dict[str, str] | None = None):
        host = WorkerHost(
            tmp_path / f"host{len(started)}",
            broker,
            ["--heartbeat-timeout", HEARTBEAT, *(args or [])],
            {"SD_SIM_ARGV_LOG": str(tmp_path / "argv.jsonl"), **SLOW, **(env or {})},
        )
        started.append(host.start())
        return host

    yield start
    stop_all(started)


def api_node(make_server: Callable[..., Server], broker: str, **kwargs) -> Server:
    return make_server(["--broker", broker, "--heartbeat-timeout", HEARTBEAT], **kwargs)


PARAMS = {"prompt": "a lighthouse in a storm", "seed": "77", "steps": "6", "iterations": "4"}


def runs_of(tmp_path: Path, url: str) -> list[dict]:
    job_id = url.rsplit("/", 1)[1]
    return [run for run in read_jsonl(tmp_path / "argv.jsonl") if job_id in " ".join(run["argv"])]


def two_hosts_one_image_in(make_server, redis_url, hosts):
    """An API node and two hosts; a job posted, running on one of them (the victim), its first
    image kept."""
    server = api_node(make_server, redis_url)
    pool = [hosts(redis_url), hosts(redis_url)]
    wait_hosts(server, 2)
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    victim, _ = host_running(server, url, pool)
    wait_until(lambda: len(server.get(url).json()["imageUrls"]) >= 1, "a first image")
    return server, pool, url, victim


def test_a_host_killed_mid_job_costs_a_rerun_elsewhere(make_server, redis_url, hosts, tmp_path):
    server, pool, url, victim = two_hosts_one_image_in(make_server, redis_url, hosts)
    victim.kill()
    doc = wait_status(server, url, FINAL, timeout=60)
    assert doc["status"] == "COMPLETE", doc
    survivor = next(host for host in pool if host is not victim)
    assert doc.get("worker") is None  # only a running job names its worker
    check_finished_job(server, url, PARAMS, tmp_path / "by-hand")
    # The second run resumed: it made only what the first had not sent.
    runs = runs_of(tmp_path, url)
    assert len(runs) == 2, runs
    assert survivor.log().count(url.rsplit("/", 1)[1]) >= 1


def test_a_stopped_host_wakes_to_find_its_job_moved(make_server, redis_url, hosts, tmp_path):
    server, _, url, victim = two_hosts_one_image_in(make_server, redis_url, hosts)
    victim.signal_all(signal.SIGSTOP)  # hung: its connections stay open
    doc = wait_status(server, url, FINAL, timeout=60)
    assert doc["status"] == "COMPLETE", doc
    before = check_finished_job(server, url, PARAMS, tmp_path / "by-hand")
    victim.signal_all(signal.SIGCONT)
    # The woken host finds its attempt superseded: it adds nothing, and serves again.
    wait_hosts(server, 2, timeout=30)
    assert check_finished_job(server, url, PARAMS) == before
    assert server.get(url).json() == doc


def test_the_api_node_killed_mid_job_catches_up(make_server, redis_url, hosts, tmp_path):
    server = api_node(make_server, redis_url)
    hosts(redis_url)
    wait_hosts(server, 1)
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    wait_until(lambda: len(server.get(url).json()["imageUrls"]) >= 1, "a first image")
    server.kill()
    time.sleep(1.5)  # the host goes on, its entries wait in the job's stream
    server.start()
    doc = wait_status(server, url, FINAL, timeout=60)
    assert doc["status"] == "COMPLETE", doc
    check_finished_job(server, url, PARAMS, tmp_path / "by-hand")
    assert len(runs_of(tmp_path, url)) == 1  # nothing made twice: one run made every image


def test_redis_down_refuses_posts_and_keeps_serving(make_server, redis_here, hosts, tmp_path):
    server = api_node(make_server, redis_here.url)
    host = hosts(redis_here.url)
    wait_hosts(server, 1)
    done = server.post_form("text-to-image", {**PARAMS, "iterations": "1"}).headers["Location"]
    assert wait_status(server, done, FINAL)["status"] == "COMPLETE"
    host.stop()
    waiting = server.post_form("text-to-image", PARAMS).headers["Location"]
    redis_here.stop()

    resp = server.post_form("text-to-image", {**PARAMS, "seed": "78"})
    assert resp.status == 503, resp.body
    assert resp.json()["error"]["code"] == "broker_unavailable"
    assert len(server.get("/jobs").json()["items"]) == 2  # not created, not even half
    assert server.get("/").status == 200
    assert server.get(done + "/1.png").status == 200
    assert server.get(waiting).json()["status"] == "QUEUED"

    redis_here.start()  # the same port, empty: it had no persistence
    hosts(redis_here.url)
    doc = wait_status(server, waiting, FINAL, timeout=60)
    assert doc["status"] == "COMPLETE", doc
    check_finished_job(server, waiting, PARAMS)
    assert server.post_form("text-to-image", {**PARAMS, "seed": "78"}).status == 303


def test_a_host_with_another_checkpoint_never_takes_the_job(
    make_server, redis_url, hosts, tmp_path
):
    other = tmp_path / "other.ckpt"
    shutil.copyfile(DEMO_MODELS / "text-to-image.ckpt", other)
    with open(other, "ab") as file:
        file.write(b"another model")
    server = api_node(make_server, redis_url)
    stranger = hosts(redis_url, ["--text-to-image-model", str(other)])
    wait_hosts(server, 1)
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    doc = wait_until(lambda: (d := server.get(url).json()).get("waiting") and d, "a reason")
    assert doc["status"] == "QUEUED"
    assert "text-to-image" in server.get("/").json()["unserved"].get("/text-to-image", ""), (
        server.get("/").json()
    )
    time.sleep(2)
    assert server.get(url).json()["status"] == "QUEUED"
    assert runs_of(tmp_path, url) == []
    assert stranger.process is not None and stranger.process.poll() is None  # alive, idle
    assert url.rsplit("/", 1)[1] not in stranger.log()  # and never took the job
    hosts(redis_url)
    assert wait_status(server, url, FINAL, timeout=60)["status"] == "COMPLETE"


def test_a_job_whose_hosts_die_three_times_fails(make_server, redis_url, hosts, tmp_path):
    server = api_node(make_server, redis_url)
    slow = {"SD_SIM_STEP_SECONDS": "0.5"}
    host = hosts(redis_url, env=slow)
    wait_hosts(server, 1)
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    for death in range(3):
        # A new host takes the job as soon as the dead one's heartbeat is overdue.
        wait_until(
            lambda host=host: server.get(url).json().get("worker", {}).get("pid") == host.pid,
            f"the job on host {death + 1}",
            timeout=60,
        )
        host.kill()
        host = hosts(redis_url, env=slow)
    doc = wait_status(server, url, FINAL, timeout=60)
    assert doc["status"] == "FAILED", doc
    assert doc["error"].startswith("its worker died 3 times: "), doc
    assert doc["error"].count("pid") == 3, doc
    # The fourth delivery ran nothing (a host may have died before its script began).
    fourth = str(tmp_path / "host3")
    assert not any(fourth in " ".join(run["argv"]) for run in runs_of(tmp_path, url))


def test_cancel_of_a_remote_job(make_server, redis_url, hosts, tmp_path):
    server = api_node(make_server, redis_url)
    pool = [hosts(redis_url, env={"SD_SIM_STEP_SECONDS": "0.5"})]
    wait_hosts(server, 1)
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    host_running(server, url, pool)
    pids = wait_until(lambda: [run["pid"] for run in runs_of(tmp_path, url)], "the script")
    resp = server.request("DELETE", url)
    assert resp.status == 200, resp.body
    assert resp.json()["status"] == "CANCELED", resp.json()
    # The host's script ends (its resident worker is interrupted), and the host serves again.
    wait_until(lambda: pool[0].log().count("canceled") >= 1, "the host to see the cancel")
    wait_hosts(server, 1)
    assert server.get(url).json()["status"] == "CANCELED"
    assert all(pid == pids[0] for pid in pids)  # one run, never started again
    assert server.post_form("text-to-image", {**PARAMS, "seed": "99"}).status == 303
