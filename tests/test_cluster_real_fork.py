"""A worker host on the real fork's unmodified scripts, behind an API node that routes by the
checkpoints' SHA-256: the images it sends are the script's bytes, made again by hand from their
labels (the same check as tests/test_real_fork.py makes of a server running the scripts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from byhand import check_made_again_by_hand
from clusterhosts import WorkerHost, stop_all, wait_hosts
from helpers import Server
from realfork import RealFork

pytestmark = pytest.mark.real_fork


@pytest.fixture(scope="module")
def cluster(
    real_fork: RealFork,
    redis_server,
    tmp_path_factory: pytest.TempPathFactory,
    certs: tuple[str, str, str],
) -> Iterator[Server]:
    redis_server.flush()
    folder = tmp_path_factory.mktemp("cluster-real-fork")
    node = Server(
        output=folder / "output",
        certs=certs,
        args=[*real_fork.server_args(), "--broker", redis_server.url],
        demo=False,
    ).start()
    host = WorkerHost(folder / "host", redis_server.url, real_fork.server_args(), demo=False)
    host.start()
    try:
        wait_hosts(node, 1, timeout=240)
        yield node
    finally:
        stop_all([host])
        node.end()


@pytest.mark.parametrize("endpoint", ["text-to-image", "inpaint-image"])
def test_a_remote_host_makes_the_scripts_bytes(
    cluster: Server, real_fork: RealFork, endpoint: str, tmp_path: Path
) -> None:
    check_made_again_by_hand(cluster, real_fork, endpoint, tmp_path)
