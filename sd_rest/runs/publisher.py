"""Publishing a run's images: each output file, once complete, copied into the job folder as
`<n>.png` (atomically) and recorded, in the order the script made them.

The scripts write their PNGs in place, so a file can be seen half written: only a complete
PNG is taken. Files are looked at when the watcher reports a change in the run's folder, when
the script's outer progress bar moves on (a batch's files are saved before it does), and once
more when the run ends.

Each image gets its metadata (labels.py: text chunks only, the script's bytes untouched) on
its way to the job folder, before it is visible. Metadata is a nicety: when making it fails
the image is published without it and the failure logged, never lost or held back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from sd_rest.endpoints import Endpoint
from sd_rest.images.pngfile import is_complete_png
from sd_rest.runs.seam import RunSink
from sd_rest.runs.watcher import watch_folder
from sd_rest.scripts import RunFolders, RunPlan
from sd_rest.state.files import write_atomic
from sd_rest.state.jobs import ImageRecord

log = logging.getLogger(__name__)


class ImagePublisher:
    def __init__(
        self,
        endpoint: Endpoint,
        folders: RunFolders,
        plan: RunPlan,
        target: Callable[[int], Path],
        sink: RunSink,
        on_fault: Callable[[OSError, str], None],
        label: Callable[[bytes, int, int], bytes] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._folders = folders
        self._plan = plan
        self._target = target  # where image n is published
        self._sink = sink
        self._on_fault = on_fault
        self._label = label  # (png, image number, position in the run) -> labelled png
        self._lock = asyncio.Lock()
        self.taken = 0  # this run's output files published so far
        self._failed = False
        self._stop_watching = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._watcher = asyncio.create_task(
            watch_folder(self._folders.images, self.publish_ready, self._stop_watching)
        )

    def look_now(self) -> None:
        """Look for finished files soon, without waiting for the watcher."""
        task = asyncio.create_task(self.publish_ready())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Stop watching, wait for every look in flight, then publish what is left."""
        self._stop_watching.set()
        if self._watcher is not None:
            await self._watcher
        await asyncio.gather(*self._pending)
        await self.publish_ready()

    async def publish_ready(self) -> None:
        """Publish, in order, every output file that is complete; stop at the first that is not."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            while self.taken < self._plan.remaining and not self._failed:
                n = self._plan.image_number(self.taken + 1)
                try:
                    digest = await loop.run_in_executor(None, self._copy_if_complete, n)
                    if digest is None:
                        return
                    record = ImageRecord(
                        n=n, seed=self._plan.seed, position=self.taken + 1, sha256=digest
                    )
                    await self._sink.published(record)
                except OSError as exc:
                    self._failed = True
                    self._on_fault(exc, f"publishing image {n}")
                    return
                self.taken += 1

    def _copy_if_complete(self, n: int) -> str | None:
        """Copy the next output file to image `n` if it is there and complete (one thread hop
        per image); returns its SHA-256, or None when it is not ready yet."""
        files = self._endpoint.outputs(self._folders)
        if self.taken >= len(files):
            return None
        try:
            data = files[self.taken].read_bytes()
        except FileNotFoundError:
            return None
        if not is_complete_png(data):
            return None
        data = self._labelled(data, n)
        write_atomic(self._target(n), data)
        return hashlib.sha256(data).hexdigest()

    def _labelled(self, data: bytes, n: int) -> bytes:
        if self._label is None:
            return data
        try:
            return self._label(data, n, self.taken + 1)
        except Exception:
            log.exception("image %d: its metadata could not be added; published without it", n)
            return data
