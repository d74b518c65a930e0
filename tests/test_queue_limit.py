"""--max-queue: beyond that many waiting jobs a POST gets a JSON 429; room frees up again."""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.jobs.manager import JobManager
from sd_rest.settings import Settings
from sd_rest.state.jobs import Job

from helpers import DEMO_MODELS, SIMULATOR, Server

TEXT_DEFAULTS = dict(ENDPOINTS["text-to-image"].defaults)


def wait_running(server: Server, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.get("/").json()["running"] != count:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.02)


def test_a_full_queue_refuses_with_429(make_server) -> None:
    # The first job holds the only worker in its model load for the whole test.
    server: Server = make_server(args=["--max-queue", "2"], env={"SD_SIM_LOAD_SECONDS": "60"})

    def post(prompt: str):
        return server.post_form("text-to-image", {"prompt": prompt, "steps": "2"})

    assert post("running").status == 303
    wait_running(server, 1)
    waiting = [post(f"waiting {n}") for n in range(2)]
    assert [r.status for r in waiting] == [303, 303]
    assert server.get("/").json()["queued"] == 2

    refused = post("one too many")
    assert refused.status == 429
    assert refused.headers["Content-Type"].startswith("application/json")
    error = refused.json()["error"]
    assert error["code"] == "queue_full"
    assert "2" in error["message"]
    assert server.get("/").json()["queued"] == 2

    # A job already queued is found, not added: no 429 for asking again.
    again = post("waiting 0")
    assert again.status == 303
    assert again.headers["Location"] == waiting[0].headers["Location"]

    canceled = server.request("DELETE", waiting[1].headers["Location"])
    assert canceled.json()["status"] == "CANCELED"
    assert post("one too many").status == 303
    assert server.get("/").json()["queued"] == 2
    assert server.stop() == 0  # a clean stop also ends the script still loading


def test_concurrent_posts_over_https_never_pass_the_bound(make_server) -> None:
    server: Server = make_server(args=["--max-queue", "20"], env={"SD_SIM_LOAD_SECONDS": "60"})
    assert server.post_form("text-to-image", {"prompt": "running", "steps": "2"}).status == 303
    wait_running(server, 1)

    def post(n: int) -> int:
        return server.post_form("text-to-image", {"prompt": f"p{n}", "steps": "2"}).status

    with ThreadPoolExecutor(max_workers=25) as pool:
        statuses = list(pool.map(post, range(150)))
    assert statuses.count(303) == 20, statuses
    assert statuses.count(429) == 130
    assert server.get("/").json()["queued"] == 20


def test_concurrent_submits_in_process_never_pass_the_bound(tmp_path: Path) -> None:
    settings = Settings(
        repository=SIMULATOR,
        python=Path(sys.executable),
        text_to_image_model=DEMO_MODELS / "text-to-image.ckpt",
        inpaint_image_model=DEMO_MODELS / "inpaint-image.ckpt",
        output=tmp_path / "output",
        max_queue=7,
    )

    async def submit_many() -> list[object]:
        manager = JobManager(settings)  # no workers started: every stored job keeps waiting
        params = [{**TEXT_DEFAULTS, "prompt": f"p{n}"} for n in range(40)]
        # Identical requests too: they share one job and never need a second place.
        params += [{**TEXT_DEFAULTS, "prompt": "p0"}] * 5
        results = await asyncio.gather(
            *(manager.submit("text-to-image", p, {}, {}) for p in params),
            return_exceptions=True,
        )
        assert manager.queue.waiting == 7
        assert manager.queue.reserve() is None  # every reservation was given back or used
        return results

    results = asyncio.run(submit_many())
    jobs = {r.id for r in results if isinstance(r, Job)}
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(jobs) == 7
    assert {e.code for e in refused} == {"queue_full"}
    assert len(refused) == 40 - 7
