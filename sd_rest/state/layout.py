"""Where everything lives under the output folder. Pure: paths only, no I/O.

<endpoint>/<id>/job.json     the sidecar (everything needed to run the job again)
<endpoint>/<id>/job.log      every run's script output
<endpoint>/<id>/inputs/      uploads, normalised to PNG
<endpoint>/<id>/run/         the current run's work folder (script outdir, inpaint cwd)
<endpoint>/<id>/<n>.png      published images
.queue/<endpoint>.<id>       marker: this job is not finished yet
.quarantine/                 job folders whose sidecar could not be read; an index or key that
                             was no usable file
.index.sqlite3               the job index for GET /jobs (index.py), derived from the sidecars
.cursor-key                  the key that signs GET /jobs cursors (cursorkey.py), mode 0600
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sd_rest.endpoints import ENDPOINTS

SIDECAR: Final = "job.json"
LOG: Final = "job.log"
INPUTS: Final = "inputs"
RUN: Final = "run"
# Always used with fullmatch: `$` also matches before a trailing newline.
ID_RE: Final = re.compile(r"[0-9a-f]{32}")
IMAGE_RE: Final = re.compile(r"([1-9][0-9]*)\.png")

Key = tuple[str, str]  # (endpoint, id)


@dataclass(frozen=True)
class Layout:
    output: Path

    @property
    def queue_dir(self) -> Path:
        return self.output / ".queue"

    @property
    def quarantine_dir(self) -> Path:
        return self.output / ".quarantine"

    @property
    def index_file(self) -> Path:
        return self.output / ".index.sqlite3"

    @property
    def index_files(self) -> tuple[Path, Path, Path]:
        """The index and SQLite's write-ahead log and shared memory beside it."""
        index = self.index_file
        return index, Path(f"{index}-wal"), Path(f"{index}-shm")

    @property
    def cursor_key_file(self) -> Path:
        return self.output / ".cursor-key"

    def endpoint_dir(self, endpoint: str) -> Path:
        return self.output / endpoint

    def job_dir(self, endpoint: str, job_id: str) -> Path:
        return self.output / endpoint / job_id

    def sidecar(self, endpoint: str, job_id: str) -> Path:
        return self.job_dir(endpoint, job_id) / SIDECAR

    def log(self, endpoint: str, job_id: str) -> Path:
        return self.job_dir(endpoint, job_id) / LOG

    def inputs_dir(self, endpoint: str, job_id: str) -> Path:
        return self.job_dir(endpoint, job_id) / INPUTS

    def run_dir(self, endpoint: str, job_id: str) -> Path:
        return self.job_dir(endpoint, job_id) / RUN

    def image(self, endpoint: str, job_id: str, n: int) -> Path:
        return self.job_dir(endpoint, job_id) / f"{n}.png"

    def marker(self, endpoint: str, job_id: str) -> Path:
        return self.queue_dir / f"{endpoint}.{job_id}"

    def script_markers(self, endpoint: str, job_id: str) -> tuple[str, ...]:
        """What the command line of this job's script holds: its run folder, its script."""
        return (str(self.run_dir(endpoint, job_id)), ENDPOINTS[endpoint].script)


def parse_marker(name: str) -> Key | None:
    """`<endpoint>.<id>` -> (endpoint, id), or None for a name that is not a marker of ours."""
    endpoint, _, job_id = name.rpartition(".")
    if endpoint in ENDPOINTS and ID_RE.fullmatch(job_id):
        return endpoint, job_id
    return None
