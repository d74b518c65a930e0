"""The jobs in memory: every unfinished job for good, finished ones in a bounded cache (the
most recently used kept), one object per job."""

from __future__ import annotations

from collections import OrderedDict

from sd_rest.state.jobs import Job
from sd_rest.state.layout import Key


class JobCache:
    def __init__(self, finished_cache: int) -> None:
        self._live: dict[Key, Job] = {}  # unfinished jobs (and any being changed)
        self._finished: OrderedDict[Key, Job] = OrderedDict()  # most recently used last
        self._finished_cache = finished_cache

    def get(self, endpoint: str, job_id: str) -> Job | None:
        key = (endpoint, job_id)
        job = self._live.get(key)
        if job is None:
            job = self._finished.get(key)
            if job is not None:
                self._finished.move_to_end(key)
        return job

    def keep(self, job: Job) -> Job:
        """Hold `job`: unfinished ones for good, finished ones in the bounded cache."""
        key = (job.endpoint, job.id)
        if job.status.finished:
            self._live.pop(key, None)
            self._finished[key] = job
            self._finished.move_to_end(key)
            while len(self._finished) > self._finished_cache:
                self._finished.popitem(last=False)
        else:
            self._finished.pop(key, None)
            self._live[key] = job
        return job

    def unfinished(self, endpoint: str, job_id: str) -> Job | None:
        job = self._live.get((endpoint, job_id))
        return job if job is not None and not job.status.finished else None

    def unfinished_jobs(self) -> list[Job]:
        return [job for job in self._live.values() if not job.status.finished]

    def drop(self, endpoint: str, job_id: str) -> None:
        self._live.pop((endpoint, job_id), None)
        self._finished.pop((endpoint, job_id), None)

    def holds(self, endpoint: str, job_id: str) -> bool:
        return (endpoint, job_id) in self._live or (endpoint, job_id) in self._finished

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)
