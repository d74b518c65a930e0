"""What the API node enqueues for a job, and what a worker host takes from it. JSON (Dramatiq's
encoding): ids, the parameters (the worker validates them again), the checkpoint the job needs
(file name, and SHA-256 when the API node knows it) and the input files' bytes. Never a path:
the worker host decides where everything goes on its own disk."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sd_rest.cluster import keys
from sd_rest.endpoints import ENDPOINTS
from sd_rest.fields import Params

if TYPE_CHECKING:
    import dramatiq

VERSION: Final = 1
_ID_CHARS: Final = frozenset("0123456789abcdef")


class BadMessage(ValueError):
    """A message that is not one a worker may run: said in the job's end entry."""


@dataclass(frozen=True)
class Checkpoint:
    name: str  # the file name only
    sha256: str | None


@dataclass(frozen=True)
class JobMessage:
    endpoint: str
    id: str
    params: Params
    checkpoint: Checkpoint
    inputs: dict[str, bytes]  # field -> the file's bytes
    # field -> SHA-256 of the bytes the client sent (they make the job's id): the worker puts
    # them in each image's metadata, as a local run does. Optional: {} when not sent.
    uploads: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "endpoint": self.endpoint,
            "id": self.id,
            "params": self.params,
            "checkpoint": {"name": self.checkpoint.name, "sha256": self.checkpoint.sha256},
            "inputs": {k: base64.b64encode(v).decode("ascii") for k, v in self.inputs.items()},
            "uploads": self.uploads,
        }

    @classmethod
    def from_json(cls, data: object) -> JobMessage:
        """Checks the shape, the endpoint, the id and the input fields (the parameters are
        checked by the worker's validation); BadMessage says what is wrong."""
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise BadMessage("not a job message of this version of sd-rest")
        endpoint = data.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise BadMessage(f"unknown endpoint {endpoint!r}")
        id_ = data.get("id")
        if not isinstance(id_, str) or len(id_) != 32 or not set(id_) <= _ID_CHARS:
            raise BadMessage(f"bad job id {id_!r}")
        params = data.get("params")
        if not isinstance(params, dict):
            raise BadMessage("params is not an object")
        checkpoint = data.get("checkpoint")
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("name"), str):
            raise BadMessage("checkpoint is not named")
        digest = checkpoint.get("sha256")
        if digest is not None and not isinstance(digest, str):
            raise BadMessage("checkpoint sha256 is not text")
        inputs = data.get("inputs")
        if not isinstance(inputs, dict):
            raise BadMessage("inputs is not an object")
        expected = set(ENDPOINTS[endpoint].input_names())
        if set(inputs) != expected:
            raise BadMessage(f"input files {sorted(inputs)}, expected {sorted(expected)}")
        try:
            decoded = {str(k): base64.b64decode(v, validate=True) for k, v in inputs.items()}
        except (binascii.Error, TypeError, ValueError):
            raise BadMessage("an input file is not base64") from None
        uploads = data.get("uploads", {})
        if not isinstance(uploads, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in uploads.items()
        ):
            raise BadMessage("uploads is not an object of digests")
        checkpoint_ = Checkpoint(checkpoint["name"], digest)
        return cls(endpoint, id_, params, checkpoint_, decoded, dict(uploads))


def dramatiq_message(queue: str, message: JobMessage) -> dramatiq.Message[Any]:
    """The Dramatiq message that carries `message` on `queue` (both halves send it: the API
    node first, a worker host again when it gives a job back)."""
    import dramatiq

    return dramatiq.Message(
        queue_name=queue, actor_name=keys.ACTOR, args=(message.to_json(),), kwargs={}, options={}
    )


def redis_id(sent: dramatiq.Message[Any]) -> str:
    """The id the Redis broker gave a message it enqueued (not Dramatiq's message_id): the
    member of its queue's list a cancel takes back."""
    return str(sent.options.get("redis_message_id", ""))
