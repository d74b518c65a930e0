from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import settings

from helpers import Server, end_all
from realfork import RealFork, build, kit_folder, skip_reason
from redisserver import RedisServer
from redisserver import skip_reason as redis_skip_reason

# The same examples on every run and every machine: a failure seen once is seen again, and a
# pass means the same thing each time (by default Hypothesis draws new examples on each run
# and replays failures kept in a local database). `--hypothesis-profile=explore` draws new ones.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile("repeatable")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A test CA and a server certificate for localhost/127.0.0.1 (files)."""
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path, ca_path = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return str(cert_path), str(key_path), str(ca_path)


@pytest.fixture
def make_server(
    tmp_path: Path, certs: tuple[str, str, str], request: pytest.FixtureRequest
) -> Iterator[Callable[..., Server]]:
    """Start servers on demand; every one still running is ended at the end of the test.
    Tests marked `no_warm_start` get servers without the resident worker's warm-up (they count
    the simulator's runs or read its event log, where the warm-up would be one more run)."""
    started: list[Server] = []
    cold = ["--no-warm-start"] if request.node.get_closest_marker("no_warm_start") else []

    def make(
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        output: Path | None = None,
        start: bool = True,
        demo: bool = True,
    ) -> Server:
        server = Server(
            output=output or tmp_path / "output",
            certs=certs,
            args=[*(args or []), *cold],
            env=env or {},
            demo=demo,
        )
        started.append(server)
        return server.start() if start else server

    yield make
    end_all(started)


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, certs: tuple[str, str, str]
) -> Iterator[Server]:
    """One demo server for a whole test module (tests that do not need their own)."""
    output = tmp_path_factory.mktemp("shared") / "output"
    server = Server(output=output, certs=certs).start()
    yield server
    server.end()


@pytest.fixture(scope="session")
def real_fork() -> RealFork:
    """The real fork's kit, built on first use (see tests/realfork.py); skips without it."""
    kit = kit_folder()
    if kit is None:
        pytest.skip(skip_reason())
    return build(kit)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the session (with a password); skips, saying why, without one."""
    reason = redis_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.flush()
    return redis_server.url
