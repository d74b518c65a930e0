"""A Dramatiq message taken apart and checked again before anything runs: the worker host
trusts no path from it, and checks the parameters with the API's own validation (a message
is only JSON in Redis: whoever can write there can write one)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sd_rest.api.validation import validate_params
from sd_rest.cluster.message import BadMessage, JobMessage
from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.images.pngfile import is_complete_png
from sd_rest.state.layout import ID_RE


@dataclass(frozen=True)
class Refused:
    """A message that must not run; `error` goes into the job's end entry (failed)."""

    endpoint: str
    id: str
    error: str


def job_key(payload: Any) -> tuple[str, str] | None:
    """The job a message is about, when it names one well enough to report to; else None
    (nothing can be said anywhere: the message is only logged)."""
    if not isinstance(payload, dict):
        return None
    endpoint, id_ = payload.get("endpoint"), payload.get("id")
    if endpoint in ENDPOINTS and isinstance(id_, str) and ID_RE.fullmatch(id_):
        return endpoint, id_
    return None


def take(payload: Any) -> JobMessage | Refused | None:
    """The message, checked; Refused saying why; None when it names no job at all."""
    key = job_key(payload)
    if key is None:
        return None
    try:
        message = JobMessage.from_json(payload)
    except BadMessage as exc:
        return Refused(*key, f"the job's message could not be read: {exc}")
    endpoint = ENDPOINTS[message.endpoint]
    try:
        params = validate_params(message.endpoint, list(message.params.items()), endpoint.files)
    except ApiError as exc:
        return Refused(*key, f"the worker refused a parameter: {exc.message}")
    for name, data in message.inputs.items():
        if not is_complete_png(data):
            return Refused(*key, f"the worker refused the input file {name}: not a PNG")
    # The checked values, with the defaults filled in: the script gets nothing unchecked.
    return replace(message, params=params)
