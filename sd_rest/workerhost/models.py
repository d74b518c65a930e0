"""The checkpoints a worker host holds, and the Dramatiq queues that follow from them.

A host consumes both queues of each checkpoint it has: `sha-…` (the API node had the file
and hashed it) and `name-…` (it had not: the file name is all it knows). A checkpoint file
missing here is not held: its jobs go to hosts that hold it. The digests come from the
server's own hash cache (runs/provenance.py), kept in the worker folder so that a restart
does not read gigabytes again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_rest.cluster import keys
from sd_rest.cluster.message import Checkpoint
from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.provenance import Provenance
from sd_rest.settings import Model, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldModel:
    model: Model
    path: Path  # resolved
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def queues(self) -> tuple[str, str]:
        return keys.queue_for(self.name, self.sha256), keys.queue_for(self.name, None)

    def matches(self, checkpoint: Checkpoint) -> bool:
        """Whether a job asking for `checkpoint` may run on this file: the same digest when
        the API node knew it, else the same file name (the queue it came by)."""
        if checkpoint.sha256:
            return checkpoint.sha256 == self.sha256
        return keys.queue_for(checkpoint.name, None) == keys.queue_for(self.name, None)

    def describe(self) -> dict[str, Any]:
        """The registry record's entry (cluster.md)."""
        return {
            "model": self.model.value,
            "name": self.name,
            "sha256": self.sha256,
            "queues": list(self.queues),
        }


def held_models(settings: Settings, provenance: Provenance) -> tuple[list[HeldModel], list[str]]:
    """The checkpoints present, hashed (blocking: the first start reads each file once), and a
    line for each one missing."""
    present: dict[Model, Path] = {}
    missing: list[str] = []
    for model in Model:
        path = settings.checkpoint(model)
        if path.is_file():
            present[model] = path.resolve()
        else:
            users = ", ".join(f"/{e.name}" for e in ENDPOINTS.values() if e.model == model)
            missing.append(
                f"the {model.value} model checkpoint {path} is missing: this worker takes no "
                f"{users} jobs (see {model.flag})"
            )
    unknown = [path for path in present.values() if provenance.checkpoint_sha256(path) is None]
    provenance.start(present.values())  # those, and the fork's commit for the images' labels
    if unknown:
        log.info("hashing %s (once: the digests are cached)", ", ".join(map(str, unknown)))
    provenance.wait()
    held = []
    for model, path in present.items():
        digest = provenance.checkpoint_sha256(path)
        if digest is None:  # unreadable (logged by the hashing): not held
            missing.append(f"the {model.value} model checkpoint {path} could not be hashed")
            continue
        held.append(HeldModel(model, path, digest))
    return held, missing


def queues_of(models: list[HeldModel]) -> list[str]:
    """Every queue to consume, each once (both models may be one file)."""
    return list(dict.fromkeys(queue for model in models for queue in model.queues))


def checkpoint_for(models: list[HeldModel], model: Model, wanted: Checkpoint) -> Path | None:
    """The local file a job must run with: the endpoint's own model when it matches, else any
    held file that does (one file may serve both models), else None."""
    ordered = sorted(models, key=lambda held: held.model is not model)
    for held in ordered:
        if held.matches(wanted):
            return held.path
    return None
