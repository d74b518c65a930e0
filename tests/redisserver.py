"""A real redis-server (Debian's package) for the cluster's tests: started on a free port in
a folder of its own, as a user runs it (a password, bound to 127.0.0.1, no persistence unless
asked). Tests can stop it, kill it and start it again on the same port."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from helpers import free_port

PASSWORD = "s3cret-test-pass"


def skip_reason() -> str | None:
    """Why the cluster's tests cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server; .ci/run does)"
    try:
        import dramatiq  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        return "the cluster extra is not installed (pip install -e '.[cluster]')"
    return None


class RedisServer:
    def __init__(self, folder: Path, password: str | None = PASSWORD, persist: bool = False):
        self.folder = folder
        self.password = password
        self.persist = persist
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def client(self):  # -> redis.Redis
        import redis

        return redis.Redis.from_url(self.url)

    def wait_ready(self, timeout: float = 10.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Gone, as a crash leaves it: nothing saved."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def flush(self) -> None:
        self.client().flushall()
