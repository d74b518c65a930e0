"""--max-queue: beyond that many waiting jobs a POST gets a JSON 429; room frees up again."""

from __future__ import annotations

import time

from helpers import Server


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
