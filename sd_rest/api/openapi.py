"""GET /openapi.json: the API as an OpenAPI 3.1 document, generated from the tables the server
itself runs on (pure).

Each field's type, default and range come from the field table (fields.py) and each
endpoint's defaults and uploads (endpoints.py), the steps the DDIM sampler cannot take from
validation.py's own test of them, the listing's and the streams' parameters from their
modules, the routes' id and image patterns from routes.py: what the document says is what
validation does. What JSON Schema cannot state (iterations × batchSize, the area of width ×
height, strength × steps) is said in the descriptions. tests/test_openapi.py checks the
document against the app's routes, the error codes raised anywhere in the code, and real
responses; schemathesis checks it against the demo server.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from sd_rest.api.a1111 import openapi as dialect
from sd_rest.api.bodies import MAX_BODY_BYTES, MAX_PARTS, MAX_TEXT_BYTES
from sd_rest.api.common import DOC_ASSETS, ID_PATTERN, IMAGE_CACHE_CONTROL, IMAGE_PATTERN
from sd_rest.api.page import CONTENT_TYPES, PREFIX, static_files
from sd_rest.api.streams import REPLAY_EVENTS, RETRY_MS, STREAM_PARAMETERS
from sd_rest.api.tokens import TOKEN_SECONDS
from sd_rest.api.validation import ddim_step_crashes
from sd_rest.endpoints import ENDPOINTS, Endpoint
from sd_rest.fields import (
    FIELDS,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_STEPS,
    MIN_PIXELS,
    MIN_STEPS,
    FileField,
    NumberField,
    TextField,
)
from sd_rest.images.uploads import MAX_UPLOAD_BYTES
from sd_rest.jobs.listing import DEFAULT_LIMIT, MAX_LIMIT, STATUS_NAMES

OPENAPI_VERSION: Final = "3.1.0"

# Every error `code`, by the status it comes with. tests/test_openapi.py finds every code the
# code raises (ApiError calls, app.HTTP_CODES) and checks that it is here under its status.
ERROR_CODES: Final[dict[int, tuple[str, ...]]] = {
    400: (
        "invalid_field",
        "missing_field",
        "unknown_field",
        "duplicate_field",
        "invalid_json",
        "invalid_body",
        "too_many_fields",
        "invalid_file",
        "image_too_large",
        "bad_request",
        "disconnected",
    ),
    401: ("unauthorized",),
    404: ("not_found",),
    405: ("method_not_allowed",),
    408: ("timeout",),
    413: ("too_large",),
    415: ("unsupported_media_type",),
    417: ("expectation_failed",),
    429: ("queue_full",),
    431: ("headers_too_large",),
    500: ("internal_error",),
    503: (
        "shutting_down",
        "model_missing",
        "python_missing",
        "index_unavailable",
        "unavailable",
        "broker_unavailable",
    ),
    504: ("timeout",),
    507: ("disk_full",),
}
OTHER_CODE: Final = "http_error"  # any other status aiohttp itself raises (app._http_error)
STATUS_TEXT: Final = {
    400: "Bad request: `field` names the field at fault, when there is one.",
    401: "The API key is missing or wrong (only when the server has one: `--api-key`).",
    404: "No such job, image or path.",
    405: "Method not allowed (`Allow` lists the methods).",
    408: "The request body did not arrive in time.",
    413: "The body, or one field or file of it, is too large.",
    415: "Not a body the server reads (content type, compression, an upload's format).",
    417: "An `Expect` header other than `100-continue`.",
    429: "The queue is full: try again later.",
    500: "A failure inside the server, logged under `requestId`; never caused by a request.",
    503: "The server is stopping, or this endpoint's checkpoint or interpreter is missing, or "
    "the job listing's index cannot be made now (with `Retry-After`), or (`--broker`) Redis "
    "cannot be reached and the job was not created (`broker_unavailable`, with `Retry-After`).",
    507: "The output disk lacks the space this job may need.",
}

ID_REGEX: Final = ID_PATTERN.split(":", 1)[1][:-1]  # "{id:<regex>}"
IMAGE_REGEX: Final = IMAGE_PATTERN.split(":", 1)[1].removesuffix("}.png")  # "{n:<regex>}.png"
MAX_IMAGE_NUMBER: Final = 10 ** (1 + int(IMAGE_REGEX.rsplit("{0,", 1)[1].rstrip("}"))) - 1
FINAL_EVENTS: Final = {"complete": "COMPLETE", "failed": "FAILED", "canceled": "CANCELED"}
STATUSES: Final = ("QUEUED", "IN_PROGRESS", "COMPLETE", "FAILED", "CANCELED")

# Control characters a prompt may not hold: all but tab, line feed and carriage return.
_PROMPT_PATTERN: Final = "^[^\\u0000-\\u0008\\u000B\\u000C\\u000E-\\u001F\\u007F]*$"
_NOT_BLANK: Final = "\\S"
_NUMBER_TEXT: Final = "^\\s*[+-]?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)([eE][+-]?[0-9]+)?\\s*$"
_INTEGER_TEXT: Final = "^\\s*[+-]?[0-9]+\\s*$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def crashing_steps() -> list[int]:
    return [s for s in range(MIN_STEPS, MAX_STEPS + 1) if ddim_step_crashes(s)]


# --- fields -----------------------------------------------------------------------------------


def _number_schema(field: NumberField) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer" if field.kind is int else "number"}
    low: int | float = int(field.low) if field.kind is int else field.low
    high: int | float = int(field.high) if field.kind is int else field.high
    if field.open_interval:
        schema["exclusiveMinimum"], schema["exclusiveMaximum"] = low, high
    else:
        schema["minimum"], schema["maximum"] = low, high
    if field.multiple != 1:
        schema["multipleOf"] = field.multiple
    if field.name == "steps":
        schema["not"] = {"enum": crashing_steps()}
    return schema


def field_schema(field: NumberField | TextField | FileField, json_body: bool = False) -> Any:
    """The schema of one field's value. In a JSON body a number may also come as a string
    (validation reads "8" as 8); forms carry text, which the document types as the number."""
    if isinstance(field, FileField):
        return {"type": "string", "contentMediaType": "application/octet-stream"}
    if isinstance(field, TextField):
        return {
            "type": "string",
            "minLength": 1,
            "maxLength": field.max_length,
            "allOf": [{"pattern": _PROMPT_PATTERN}, {"pattern": _NOT_BLANK}],
        }
    schema = _number_schema(field)
    if json_body:
        text = _INTEGER_TEXT if field.kind is int else _NUMBER_TEXT
        return {"anyOf": [schema, {"type": "string", "pattern": text}]}
    return schema


def _field_description(endpoint: Endpoint, name: str) -> str:
    field = FIELDS[name]
    text = field.description
    if isinstance(field, NumberField):
        kind = "an integer" if field.kind is int else "a number"
        low, high = (
            (str(int(field.low)), str(int(field.high)))
            if field.kind is int
            else (f"{field.low:g}", f"{field.high:g}")
        )
        if field.open_interval:
            bounds = f"strictly between {low} and {high}"
        else:
            bounds = f"from {low} to {high}"
        multiple = f", a multiple of {field.multiple}" if field.multiple != 1 else ""
        text += f" {kind.capitalize()} {bounds}{multiple}."
    if endpoint.name == "image-to-image" and name == "image":
        text += (
            " Cropped (top-left) to multiples of 64; after the crop its area must be between "
            f"{MIN_PIXELS} and {MAX_PIXELS} pixels, each side at most 2048."
        )
    if endpoint.name == "inpaint-image" and name == "image":
        text += (
            " Cropped (top-left) to multiples of 32; after the crop its area must be between "
            f"{MIN_PIXELS} and {MAX_PIXELS} pixels."
        )
    if name == "mask":
        text += (
            " Of another size but the image's aspect ratio (within 1%) it is resized to the "
            "image; another aspect ratio is refused."
        )
    if name in endpoint.files:
        text += f" At most {MAX_UPLOAD_BYTES} bytes."
    return text


def _body_schema(endpoint: Endpoint, json_body: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, default in endpoint.defaults.items():
        schema = {**field_schema(FIELDS[name], json_body)}
        schema["description"] = _field_description(endpoint, name)
        if default is None:
            required.append(name)
        else:
            schema["default"] = default
        properties[name] = schema
    for name in endpoint.files:
        properties[name] = {
            **field_schema(FIELDS[name]),
            "description": _field_description(endpoint, name),
        }
        required.append(name)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "description": _rules(endpoint),
    }
    if required:
        schema["required"] = required
    return schema


def _rules(endpoint: Endpoint) -> str:
    """The cross-field rules (validation._check_combinations), in words."""
    rules = []
    if "iterations" in endpoint.defaults and "batchSize" in endpoint.defaults:
        rules.append(f"iterations × batchSize must be at most {MAX_IMAGES} (images per job).")
    if "width" in endpoint.defaults:
        rules.append(
            f"width × height must be between {MIN_PIXELS} (256×256) and {MAX_PIXELS} "
            "(1024×1024) pixels."
        )
    if "strength" in endpoint.defaults:
        rules.append("strength × steps must be at least 1 (else the sampler runs zero steps).")
    refused = [f"`{name}` ({why})" for name, why in endpoint.refused.items()]
    if refused:
        rules.append("Refused here by name: " + "; ".join(refused) + ".")
    rules.append("Any other field is refused (`unknown_field`), as is a field given twice.")
    return " ".join(rules)


# --- shapes -----------------------------------------------------------------------------------


def _object(properties: dict[str, Any], required: Iterable[str] = (), **more: Any) -> Any:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
        **more,
    }


def _schemas() -> dict[str, Any]:
    endpoints = list(ENDPOINTS)
    result_url = f"^/({'|'.join(endpoints)})/{ID_REGEX}$"
    image_url = f"^/({'|'.join(endpoints)})/{ID_REGEX}/{IMAGE_REGEX}\\.png$"
    schemas: dict[str, Any] = {
        "Progress": _object(
            {
                "currentImageIndex": {"type": "integer", "minimum": 1},
                "currentImageProgress": {"type": "number", "minimum": 0, "maximum": 1},
                "totalImages": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGES},
            },
            ["currentImageIndex", "currentImageProgress", "totalImages"],
            description="1-based index of the image being made, the fraction of its sampler "
            "steps done, and iterations × batchSize.",
        ),
        "Image": _object(
            {
                "url": {"type": "string", "pattern": image_url},
                "seed": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": int(_number(FIELDS["seed"]).high),
                    "description": "The seed of the run that made it.",
                },
                "position": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Its place among that run's images (1-based).",
                },
            },
            ["url", "seed", "position"],
        ),
        "Params": _object(
            {
                name: field_schema(field)
                for name, field in FIELDS.items()
                if not isinstance(field, FileField)
            },
            description="The job's normalised parameters: every field of its endpoint, "
            "defaults applied, numbers as numbers (uploads are not repeated).",
        ),
        "Error": _error_schema(sorted({c for cs in ERROR_CODES.values() for c in cs})),
    }
    base = {
        "status": {"type": "string"},
        "resultUrl": {"type": "string", "pattern": result_url},
        "imageUrls": {"type": "array", "items": {"type": "string", "pattern": image_url}},
        "images": {"type": "array", "items": _ref("Image")},
    }
    item = {
        "id": {"type": "string", "pattern": f"^{ID_REGEX}$"},
        "endpoint": {"type": "string", "enum": endpoints},
        "createdAt": {"type": "string", "format": "date-time"},
        "startedAt": {"type": ["string", "null"], "format": "date-time"},
        "finishedAt": {"type": ["string", "null"], "format": "date-time"},
        "params": _ref("Params"),
    }
    worker = {
        "worker": _object(
            {"host": {"type": "string"}, "pid": {"type": "integer"}},
            ["host", "pid"],
            description="`--broker`: the worker host running the job (the pid of its "
            "`worker` process, on that host); absent for a run on this server.",
        )
    }
    waiting = {
        "waiting": {
            "type": "string",
            "description": "`--broker`: why the job waits, when no live worker host holds "
            "its checkpoint.",
        }
    }
    extra = {
        "QUEUED": ({"position": {"type": "integer", "minimum": 0}, **worker, **waiting}, []),
        "IN_PROGRESS": ({"progress": _ref("Progress"), **worker}, ["progress"]),
        "COMPLETE": ({}, []),
        "FAILED": ({"error": {"type": "string"}}, ["error"]),
        "CANCELED": ({}, []),
    }
    required = ["status", "resultUrl", "imageUrls", "images"]
    for status, (more, needed) in extra.items():
        name = status.title().replace("_", "")
        properties = {**base, "status": {"const": status}, **more}
        schemas[f"Job{name}"] = _object(properties, [*required, *needed])
        schemas[f"Item{name}"] = _object({**properties, **item}, [*required, *needed, *item.keys()])
    schemas["JobStatus"] = {
        "oneOf": [_ref(f"Job{s.title().replace('_', '')}") for s in STATUSES],
        "description": "A job's status document. QUEUED: `position` is 1 for the next job "
        "to start, 0 once a worker has taken it (its script loads); none for a job put back "
        "in the queue while the server stops. IN_PROGRESS from the script's first progress "
        "bar. `imageUrls` lists finished images in order; `images` gives each one's seed "
        "and position in its run.",
    }
    schemas["JobItem"] = {
        "oneOf": [_ref(f"Item{s.title().replace('_', '')}") for s in STATUSES],
        "description": "A job in the listing and the event streams: its status document "
        "plus id, endpoint, times (ISO 8601, UTC) and params.",
    }
    schemas["FinalItem"] = {
        "oneOf": [_ref(f"Item{s.title()}") for s in FINAL_EVENTS.values()],
    }
    schemas["JobPage"] = _object(
        {
            "items": {"type": "array", "items": _ref("JobItem")},
            "nextCursor": {"type": ["string", "null"]},
        },
        ["items", "nextCursor"],
    )
    schemas["ServerInfo"] = {
        "type": "object",
        "properties": {
            "name": {"const": "sd-rest"},
            "version": {"type": "string"},
            "endpoints": {"type": "array", "items": {"enum": [f"/{e}" for e in endpoints]}},
            "running": {"type": "integer", "minimum": 0},
            "queued": {"type": "integer", "minimum": 0},
            "runner": {"type": "string", "enum": ["resident", "process", "remote"]},
            "workers": {
                "type": "array",
                "items": {"type": "object"},
                "description": "Each resident worker's state (none with `--runner process`): "
                "`warming`, `idle`, `busy`, or `gone` (listed for a while after it died or was "
                "killed unasked), from its last heartbeat; see the README's `GET /`. With "
                "`--broker` (`runner` is `remote`): each live worker host, with `host`, `pid`, "
                "`state` (`idle` or `busy`), `jobs`, `models`, `served` and `last_heartbeat`.",
            },
            "unserved": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "`--broker`: each endpoint no live worker host can serve "
                "(none holds its checkpoint), and why; its jobs wait.",
            },
        },
        "required": ["name", "version", "endpoints", "running", "queued"],
    }
    schemas["StreamToken"] = _object(
        {
            "token": {"type": "string"},
            "expiresAt": {"type": "string", "format": "date-time"},
            "expiresIn": {"type": "integer", "minimum": 0, "maximum": TOKEN_SECONDS},
        },
        ["token", "expiresAt", "expiresIn"],
    )
    ids = {"id": item["id"], "endpoint": item["endpoint"]}
    schemas["EventQueued"] = _object(
        {**ids, "position": {"type": "integer", "minimum": 0}}, [*ids, "position"]
    )
    schemas["EventProgress"] = _object({**ids, "progress": _ref("Progress")}, [*ids, "progress"])
    schemas["EventImage"] = _object(
        {
            **ids,
            "url": {"type": "string", "pattern": image_url},
            "number": {"type": "integer", "minimum": 1},
            "seed": {"type": "integer", "minimum": 0},
            "position": {"type": "integer", "minimum": 1},
        },
        [*ids, "url", "number", "seed", "position"],
    )
    schemas["EventSnapshotAll"] = _object(
        {"jobs": {"type": "array", "items": _ref("JobItem")}}, ["jobs"]
    )
    for status, codes in ERROR_CODES.items():
        schemas[f"Error{status}"] = _error_schema(list(codes))
    return schemas


def _number(field: object) -> NumberField:
    assert isinstance(field, NumberField)
    return field


def _error_schema(codes: list[str]) -> dict[str, Any]:
    error = _object(
        {
            "code": {"type": "string", "enum": [*codes, OTHER_CODE]},
            "message": {"type": "string"},
            "field": {"type": "string"},
            "requestId": {"type": "string"},
        },
        ["code", "message"],
    )
    return _object({"error": error}, ["error"])


def _error_response(status: int, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    codes = ", ".join(f"`{code}`" for code in ERROR_CODES[status])
    response: dict[str, Any] = {
        "description": f"{STATUS_TEXT[status]} Codes: {codes}.",
        "content": {"application/json": {"schema": _ref(f"Error{status}")}},
    }
    if headers:
        response["headers"] = headers
    return response


def _responses() -> dict[str, Any]:
    string = {"schema": {"type": "string"}}
    responses = {
        f"Error{status}": _error_response(status)
        for status in STATUS_TEXT
        if status not in (401, 405)
    }
    responses["Error401"] = _error_response(
        401, {"WWW-Authenticate": {**string, "description": 'Bearer realm="sd-rest"'}}
    )
    responses["Error405"] = _error_response(
        405, {"Allow": {**string, "description": "The methods the path takes."}}
    )
    responses["Error503"] = _error_response(
        503,
        {
            "Retry-After": {
                "schema": {"type": "integer", "minimum": 1},
                "description": "With `index_unavailable` and `broker_unavailable`: the "
                "seconds to wait before asking again.",
            }
        },
    )
    return responses


# --- operations -------------------------------------------------------------------------------

_EVENTS_TEXT: Final = (
    "Server-sent events (`text/event-stream`). Every event has an increasing numeric `id:` "
    f"(across jobs and restarts); each connection starts with `retry: {RETRY_MS}`. "
    f"A reconnection with `Last-Event-ID` (or `lastEventId`) gets the events after that id "
    f"while the server still holds them (the last {REPLAY_EVENTS}), else one `snapshot`. "
    "A comment line `: ping` comes after 15 s with nothing else to send "
    "(`SD_REST_STREAM_PING`). Each event's `data` is one JSON object."
)


def _stream_parameters() -> list[dict[str, Any]]:
    described = {
        "token": "A token from POST /events/token: opens the stream without the "
        "Authorization header (for EventSource).",
        "lastEventId": "Resume after this event id (as the Last-Event-ID header does).",
    }
    parameters = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": described[name],
        }
        for name in STREAM_PARAMETERS
    ]
    parameters.append(
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "The id of the last event seen (EventSource sends it itself).",
        }
    )
    return parameters


def _stream_response(events: dict[str, Any], description: str) -> dict[str, Any]:
    """An event stream: its `schema` describes one event as a client parses it (the reading
    of OpenAPI 3.1 that 3.2 names `itemSchema`), one branch per event name, each with the
    schema of its JSON `data` as `contentSchema`."""
    branches = [
        {
            "type": "object",
            "properties": {
                "event": {"const": name},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "retry": {"const": RETRY_MS},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": schema,
                },
            },
            "required": ["event", "data", "id"],
        }
        for name, schema in events.items()
    ]
    return {
        "description": description,
        "content": {
            "text/event-stream": {
                "schema": {"oneOf": branches, "description": _EVENTS_TEXT},
            }
        },
    }


def _job_events() -> dict[str, Any]:
    events: dict[str, Any] = {
        "snapshot": _ref("JobItem"),
        "queued": _ref("EventQueued"),
        "started": _ref("EventProgress"),
        "progress": _ref("EventProgress"),
        "image": _ref("EventImage"),
    }
    for name in FINAL_EVENTS:
        events[name] = _ref("FinalItem")
    return events


def _json(schema: dict[str, Any], description: str, **more: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **more,
    }


class _Builder:
    def __init__(self, api_key: bool) -> None:
        self.api_key = api_key
        self.paths: dict[str, dict[str, Any]] = {}

    def errors(self, *statuses: int) -> dict[str, Any]:
        """The error responses of an operation: those it names, and those of any request
        (malformed HTTP, an unknown Expect, a failure inside the server, a missing key)."""
        every = {400, 417, 500, *statuses}
        if self.api_key:
            every.add(401)
        return {str(status): _response_ref(f"Error{status}") for status in sorted(every)}

    def add(
        self,
        path: str,
        method: str,
        operation: dict[str, Any],
        head: bool = False,
        parameters: list[dict[str, Any]] | None = None,
        options: bool = True,
    ) -> None:
        item = self.paths.setdefault(path, {})
        if parameters:
            item["parameters"] = parameters
        if "security" not in operation and self.api_key:
            operation["security"] = [{"bearerAuth": []}]
        item[method] = operation
        if head:
            # The same answers without their bodies (aiohttp: HEAD of a GET route).
            responses = {
                status: _without_body(response)
                for status, response in operation["responses"].items()
            }
            item["head"] = {
                "operationId": "head"
                + operation["operationId"][:1].upper()
                + operation["operationId"][1:],
                "summary": f"{operation['summary']} (headers only)",
                "tags": operation["tags"],
                "responses": responses,
                **({"security": operation["security"]} if "security" in operation else {}),
            }
        if options and "options" not in item:
            item["options"] = {
                "operationId": "options" + _camel(path),
                "summary": "CORS preflight",
                "tags": ["CORS"],
                "security": [],
                "responses": {
                    "204": {"description": "Allowed: CORS headers, no body."},
                    # A path whose id or number is not of the pattern is no route at all.
                    **({"404": _response_ref("Error404")} if "{" in path else {}),
                },
            }


def _without_body(response: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in response:
        status = int(response["$ref"].rsplit("Error", 1)[1])
        response = _responses()[f"Error{status}"]
    return {key: value for key, value in response.items() if key != "content"}


def _camel(path: str) -> str:
    words = [w for w in path.replace("{", "").replace("}", "").replace(".", "-").split("/") if w]
    parts = [p for word in words for p in word.replace("_", "-").split("-")]
    return "".join(part[:1].upper() + part[1:] for part in parts) or "Root"


def build_document(version: str, api_key: bool) -> dict[str, Any]:
    """The OpenAPI document of a server: `api_key` whether it was started with one."""
    b = _Builder(api_key)
    job_status = {"$ref": "#/components/schemas/JobStatus"}
    id_parameter = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": f"^{ID_REGEX}$"},
        "description": "The job's id: 32 lowercase hex characters.",
    }
    vary = {"Vary": {"schema": {"const": "Accept"}, "description": "The answer depends on Accept."}}
    b.add(
        "/",
        "get",
        {
            "operationId": "getServer",
            "summary": "The server: version, endpoints, jobs running and queued",
            "description": "A browser, whose Accept asks for text/html before "
            "application/json, gets the web page instead (page.py); `*/*` and no Accept get "
            "the JSON.",
            "tags": ["Server"],
            "responses": {
                "200": {
                    "description": "The server, or the web page for a browser.",
                    "headers": vary,
                    "content": {
                        "application/json": {"schema": _ref("ServerInfo")},
                        "text/html": {"schema": {"type": "string"}},
                    },
                },
                "304": {"description": "The page has not changed (If-None-Match)."},
                **b.errors(),
            },
        },
        head=True,
    )
    for name, endpoint in ENDPOINTS.items():
        _endpoint_paths(b, name, endpoint, job_status, id_parameter)
    _listing_and_streams(b)
    _documentation_paths(b)
    _page_paths(b)
    for path, method, operation, head in dialect.operations():
        # Errors before the handler (malformed HTTP, a missing key, too large) are ours.
        statuses = [int(status) for status in operation["responses"] if status != "200"]
        common = {k: v for k, v in b.errors(413).items() if int(k) not in statuses}
        operation["responses"] = {**operation["responses"], **common}
        b.add(path, method, operation, head=head)
    security_schemes: dict[str, Any] = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <key>`, when the server was started with "
            "`--api-key` (or `SD_REST_API_KEY`); every path but the CORS preflights and "
            "this documentation's page needs it then. "
            + ("This server has a key." if api_key else "This server has none."),
        },
        "streamToken": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "A stream token (POST /events/token), for event streams only.",
        },
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "sd-rest",
            "version": version,
            "summary": "Stable Diffusion's scripts behind a REST API",
            "description": _INFO,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "Jobs", "description": "Make images: one endpoint per script."},
            {"name": "Listing", "description": "Every job, a page at a time."},
            {"name": "Events", "description": "Server-sent event streams."},
            {"name": "Server", "description": "The server and this description of it."},
            {"name": "CORS", "description": "Preflights: open to every origin."},
            {"name": dialect.TAG, "description": "AUTOMATIC1111's /sdapi/v1, in its shapes."},
        ],
        "paths": b.paths,
        "components": {
            "schemas": {**_schemas(), **dialect.SCHEMAS},
            "responses": _responses(),
            "securitySchemes": security_schemes,
        },
        **({"security": [{"bearerAuth": []}]} if api_key else {}),
    }


_INFO: Final = (
    "A drop-in for the Node.js `stable-diffusion-rest-api`: POST a job, follow the `303` to "
    "its status, GET its images. Every error is JSON of one shape, "
    '`{"error": {"code", "message", "field"?}}`, with a stable `code`. Every response '
    "carries CORS headers (any origin). Bodies: `multipart/form-data` always, "
    "`application/x-www-form-urlencoded` or `application/json` where no file is needed; at "
    f"most {MAX_BODY_BYTES} bytes, {MAX_PARTS} fields and files, {MAX_TEXT_BYTES} bytes per "
    "text field or JSON body. Each published PNG carries its parameters in a `parameters` "
    "text chunk (AUTOMATIC1111's format) and an `sd-rest` chunk of JSON (see the README)."
)


def _endpoint_paths(
    b: _Builder, name: str, endpoint: Endpoint, job_status: Any, id_parameter: Any
) -> None:
    article = "an" if name[0] in "aeiou" else "a"
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": _body_schema(endpoint, json_body=False),
            **(
                {
                    "encoding": {
                        f: {"contentType": "image/png, image/jpeg, image/webp"}
                        for f in endpoint.files
                    }
                }
                if endpoint.files
                else {}
            ),
        }
    }
    if not endpoint.files:
        content["application/x-www-form-urlencoded"] = {
            "schema": _body_schema(endpoint, json_body=False)
        }
        content["application/json"] = {"schema": _body_schema(endpoint, json_body=True)}
    location = {
        "Location": {
            "required": True,
            "schema": {"type": "string", "pattern": f"^/{name}/{ID_REGEX}$"},
            "description": "The job's status URL, `/<endpoint>/<id>`.",
        }
    }
    b.add(
        f"/{name}",
        "post",
        {
            "operationId": "post" + _camel(name),
            "summary": f"Submit {article} {name} job ({endpoint.script})",
            "description": "Answers `303 See Other` with `Location: /"
            + name
            + "/<id>` and the job's status as the body. The id is a hash of the normalised "
            "parameters, the checkpoint and the uploads: the same request again returns the "
            "same job (a FAILED or CANCELED one is queued anew, keeping its images). "
            + _rules(endpoint),
            "tags": ["Jobs"],
            "requestBody": {"required": True, "content": content},
            "responses": {
                "303": _json(job_status, "The job, new or existing.", headers=location),
                **b.errors(408, 413, 415, 429, 503, 507),
            },
        },
    )
    job_path = f"/{name}/{{id}}"
    b.add(
        job_path,
        "get",
        {
            "operationId": "get" + _camel(name) + "Job",
            "summary": f"{article.capitalize()} {name} job's status",
            "tags": ["Jobs"],
            "responses": {"200": _json(job_status, "The job's status."), **b.errors(404)},
        },
        head=True,
        parameters=[id_parameter],
    )
    b.paths[job_path]["delete"] = {
        "operationId": "delete" + _camel(name) + "Job",
        "summary": f"Cancel {article} {name} job",
        "description": "A queued job is CANCELED at once, a running one within a second, "
        "keeping its finished images. Idempotent.",
        "tags": ["Jobs"],
        "responses": {"200": _json(job_status, "The job, canceled."), **b.errors(404)},
        **({"security": [{"bearerAuth": []}]} if b.api_key else {}),
    }
    image_path = f"/{name}/{{id}}/{{n}}.png"
    etag = {
        "ETag": {"schema": {"type": "string"}, "description": "The image's SHA-256, quoted."},
        "Cache-Control": {"schema": {"const": IMAGE_CACHE_CONTROL}},
    }
    b.add(
        image_path,
        "get",
        {
            "operationId": "get" + _camel(name) + "Image",
            "summary": f"A finished {name} image",
            "description": "A finished image never changes. It carries its parameters in a "
            "`parameters` text chunk (AUTOMATIC1111's infotext) and an `sd-rest` chunk (JSON).",
            "tags": ["Jobs"],
            "parameters": [
                {
                    "name": "If-None-Match",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                }
            ],
            "responses": {
                "200": {
                    "description": "The PNG.",
                    "headers": etag,
                    "content": {
                        "image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}
                    },
                },
                "304": {"description": "Not modified (If-None-Match).", "headers": etag},
                **b.errors(404),
            },
        },
        head=True,
        parameters=[
            id_parameter,
            {
                "name": "n",
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGE_NUMBER},
                "description": "The image's number, 1..N in the order they were made.",
            },
        ],
    )
    b.add(
        f"/{name}/{{id}}/events",
        "get",
        {
            "operationId": "stream" + _camel(name) + "Job",
            "summary": f"{article.capitalize()} {name} job's events",
            "description": "`snapshot` first (or the final event alone for a finished job), "
            "then `queued`, `started`, `progress`, `image`, and one final `complete`, "
            "`failed` or `canceled`, after which the stream ends.",
            "tags": ["Events"],
            "parameters": _stream_parameters(),
            "responses": {
                "200": _stream_response(_job_events(), "The job's event stream."),
                "204": {"description": "The reconnection has seen the job's final event."},
                **b.errors(404, 503),
            },
            **({"security": [{"bearerAuth": []}, {"streamToken": []}]} if b.api_key else {}),
        },
        parameters=[id_parameter],
    )


def _listing_and_streams(b: _Builder) -> None:
    listing_parameters = [
        {
            "name": "status",
            "in": "query",
            "required": False,
            "style": "form",
            "explode": False,
            "schema": {"type": "array", "items": {"type": "string", "enum": list(STATUS_NAMES)}},
            "description": "Only jobs with these statuses (`running` is IN_PROGRESS; a job "
            "whose script is loading reads QUEUED), comma-separated or repeated; any case.",
        },
        {
            "name": "endpoint",
            "in": "query",
            "required": False,
            "style": "form",
            "explode": False,
            "schema": {"type": "array", "items": {"type": "string", "enum": list(ENDPOINTS)}},
            "description": "Only jobs of these endpoints, comma-separated or repeated.",
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_LIMIT,
                "default": DEFAULT_LIMIT,
            },
        },
        {
            "name": "cursor",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "The previous page's `nextCursor`, as it is.",
        },
    ]
    b.add(
        "/jobs",
        "get",
        {
            "operationId": "listJobs",
            "summary": "Every job, newest first, a page at a time",
            "description": "A job keeps its place for good, so pages never skip or repeat a "
            "job while others arrive. Any other parameter, `limit` or `cursor` given twice, a "
            "bad value or a cursor this server did not sign is a 400 naming it.",
            "tags": ["Listing"],
            "parameters": listing_parameters,
            "responses": {"200": _json(_ref("JobPage"), "A page."), **b.errors(503)},
        },
        head=True,
    )
    b.add(
        "/events",
        "get",
        {
            "operationId": "streamAllJobs",
            "summary": "Every job's events, on one stream that does not end",
            "description": "`snapshot` first (every unfinished job), then every job's events "
            "in the order they happened.",
            "tags": ["Events"],
            "parameters": _stream_parameters(),
            "responses": {
                "200": _stream_response(
                    {**_job_events(), "snapshot": _ref("EventSnapshotAll")},
                    "Every job's event stream.",
                ),
                **b.errors(503),
            },
            **({"security": [{"bearerAuth": []}, {"streamToken": []}]} if b.api_key else {}),
        },
    )
    b.add(
        "/events/token",
        "post",
        {
            "operationId": "makeStreamToken",
            "summary": "A short-lived token that opens event streams",
            "description": f"For EventSource, which cannot send headers: valid {TOKEN_SECONDS} "
            "s, any number of times, for event streams only (`?token=`).",
            "tags": ["Events"],
            "responses": {
                "200": _json(
                    _ref("StreamToken"),
                    "The token.",
                    headers={"Cache-Control": {"schema": {"const": "no-store"}}},
                ),
                **b.errors(),
            },
        },
    )


def _page_paths(b: _Builder) -> None:
    """The web page's files (page.py): served before routing and before the API key check,
    for GET and HEAD only (anything else there is a 404, as for any path that is no route)."""
    names = sorted(static_files())
    types = sorted({CONTENT_TYPES[Path(name).suffix].split(";")[0] for name in names})
    page_errors = {k: v for k, v in b.errors(404).items() if k != "401"}
    revalidated = {"304": {"description": "Not modified (If-None-Match with its ETag)."}}
    b.add(
        PREFIX,
        "get",
        {
            "operationId": "getPage",
            "summary": "The web page (as / gives a browser)",
            "tags": ["Server"],
            "security": [],
            "responses": {
                "200": {"description": "The page.", "content": {"text/html": {"schema": {}}}},
                **revalidated,
                **page_errors,
            },
        },
        head=True,
        options=False,
    )
    b.add(
        PREFIX + "{file}",
        "get",
        {
            "operationId": "getPageFile",
            "summary": "One of the web page's files",
            "tags": ["Server"],
            "security": [],
            "responses": {
                "200": {
                    "description": "The file.",
                    "content": {media: {"schema": {}} for media in types},
                },
                **revalidated,
                **page_errors,
            },
        },
        head=True,
        parameters=[
            {
                "name": "file",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "enum": names},
                "description": "Only these names are served; anything else is a 404.",
            }
        ],
        options=False,
    )


def _documentation_paths(b: _Builder) -> None:
    b.add(
        "/openapi.json",
        "get",
        {
            "operationId": "getOpenApi",
            "summary": "This document",
            "tags": ["Server"],
            "responses": {
                "200": _json({"type": "object"}, "The OpenAPI 3.1 document."),
                **b.errors(),
            },
        },
        head=True,
    )
    for path, (content_type, summary) in DOC_ASSETS.items():
        b.add(
            path,
            "get",
            {
                "operationId": "getDocs" + _camel(path.removeprefix("/docs")),
                "summary": summary,
                "description": "Served from files in the package: no CDN, works offline. "
                "Open without the API key (the page asks for it).",
                "tags": ["Server"],
                "security": [],
                "responses": {
                    "200": {
                        "description": summary,
                        "content": {content_type: {"schema": {"type": "string"}}},
                    },
                    **{k: v for k, v in b.errors().items() if k != "401"},
                },
            },
            head=True,
        )
