"""GET /openapi.json and GET /docs: the document is valid OpenAPI 3.1, names every route of the
app and every error code of the code, says what validation does, and every kind of real
response validates against it; the docs page is served from the package, offline, open
without the API key."""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from sd_rest import __version__
from sd_rest.api.app import HTTP_CODES, create_app
from sd_rest.api.common import DOC_ASSETS
from sd_rest.api.docs import STATIC, asset_file
from sd_rest.api.openapi import ERROR_CODES, build_document, crashing_steps
from sd_rest.api.page import static_files
from sd_rest.api.validation import validate_params
from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.fields import FIELDS, FileField, NumberField
from sd_rest.jobs.manager import JobManager

from helpers import ROOT, Server, mask_bytes, png_bytes, wait_until
from inprocess import settings
from openapicheck import OpenApi
from sse import EventStream

SOURCE = ROOT / "sd_rest"


@pytest.mark.parametrize("api_key", [False, True])
def test_the_document_is_valid_openapi_3_1(api_key: bool) -> None:
    doc = build_document(__version__, api_key)
    validate(doc)  # openapi-spec-validator: raises on anything invalid
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == __version__
    assert ("security" in doc) == api_key
    ids = [
        op["operationId"]
        for item in doc["paths"].values()
        for op in item.values()
        if "responses" in op
    ]
    # 22 paths of our own and 15 of AUTOMATIC1111's: each operation once, HEAD and OPTIONS too
    assert len(ids) == len(set(ids)) == 101


def _app_routes(tmp_path: Path, **changes: Any) -> set[tuple[str, str]]:
    app: web.Application = create_app(JobManager(settings(tmp_path / "output", **changes)))
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        found.add((route.method.lower(), re.sub(r"{(\w+):[^}]*}", r"{\1}", path)))
    return found


def _document_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "post", "delete", "head", "options", "put", "patch"}
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in methods}


def test_every_route_of_the_app_is_in_the_document_and_nothing_else(tmp_path: Path) -> None:
    app_routes = _app_routes(tmp_path)
    assert ("get", "/text-to-image/{id}/{n}.png") in app_routes  # the comparison means something
    assert ("get", "/events") in app_routes and ("post", "/events/token") in app_routes
    doc = build_document(__version__, False)
    # The web page's files are served before routing (page.py): documented as paths too.
    page = {(m, p) for m in ("get", "head") for p in ("/ui/", "/ui/{file}")}
    assert _document_routes(doc) == app_routes | page
    names = doc["paths"]["/ui/{file}"]["parameters"][0]["schema"]["enum"]
    assert names == sorted(static_files()) and "app.js" in names


def _raised_codes() -> set[tuple[int, str]]:
    """(status, code) of every ApiError the code makes with literal values, and of `invalid`."""
    found: set[tuple[int, str]] = set()
    for path in SOURCE.rglob("*.py"):  # every package; the simulator raises no ApiError
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            args = node.args
            if name == "invalid":
                found.add((400, "invalid_field"))
            elif (
                name == "ApiError"
                and len(args) >= 2
                and isinstance(args[1], ast.Constant)
                and isinstance(args[0], ast.Constant)
            ):
                found.add((args[0].value, args[1].value))
    return found


def test_every_error_code_of_the_code_is_documented_under_its_status() -> None:
    raised = _raised_codes() | set(HTTP_CODES.items()) | {(500, "internal_error")}
    assert (503, "model_missing") in raised and (400, "image_too_large") in raised
    documented = {(status, code) for status, codes in ERROR_CODES.items() for code in codes}
    assert raised - documented == set()
    doc = build_document(__version__, False)
    for status, codes in ERROR_CODES.items():
        enum = doc["components"]["schemas"][f"Error{status}"]["properties"]["error"]
        assert set(codes) <= set(enum["properties"]["code"]["enum"])


# --- the fields: the document says what validation does -------------------------------------


def _probe_values(name: str) -> list[Any]:
    field = FIELDS[name]
    if isinstance(field, NumberField):
        values: list[Any] = [field.low, field.high, field.low - 1, field.high + 1]
        step = (field.high - field.low) / 100  # near the bounds, clear of the cross rules
        values += [(field.low + field.high) / 2, field.low + step, field.high - step]
        if field.kind is int:
            values = [int(v) for v in values] + [int(field.low) + 1, int(field.high) - 1]
        if field.multiple != 1:
            values += [field.low + field.multiple // 2, field.low + field.multiple]
        if name == "steps":
            values += [*crashing_steps(), 2, 100, 112]
        return sorted(set(values), key=float)
    return ["", " ", "a", "a\tb\nc", "a\x01b", "\x7f", "x" * 1000, "x" * 1001, "猫"]


def _others(endpoint: str, name: str, value: Any) -> dict[str, Any]:
    """Other fields chosen so that no rule across fields can refuse `value` (those rules are
    in the descriptions, not the schema)."""
    others: dict[str, Any] = {}
    if "prompt" in ENDPOINTS[endpoint].defaults and name != "prompt":
        others["prompt"] = "a cat"
    if name == "width" and isinstance(value, int) and value > 0:
        others["height"] = 1024 if value <= 1024 else 512
    if name == "height" and isinstance(value, int) and value > 0:
        others["width"] = 1024 if value <= 1024 else 512
    if name == "steps" and "strength" in ENDPOINTS[endpoint].defaults:
        others["strength"] = 0.99
    if name == "strength":
        others["steps"] = 250
    return others


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_the_fields_of_the_document_are_the_field_table_and_validation_agrees(
    endpoint: str,
) -> None:
    doc = build_document(__version__, False)
    spec = ENDPOINTS[endpoint]
    body = doc["paths"][f"/{endpoint}"]["post"]["requestBody"]["content"]["multipart/form-data"]
    schema = body["schema"]
    assert list(schema["properties"]) == [*spec.defaults, *spec.files]
    assert schema["required"] == [n for n, d in spec.defaults.items() if d is None] + list(
        spec.files
    )
    for name, default in spec.defaults.items():
        prop = schema["properties"][name]
        assert prop.get("default") == default
        assert FIELDS[name].description in prop["description"]
        checker = Draft202012Validator(prop)
        for value in _probe_values(name):
            if name == "steps" and "strength" in spec.defaults and value == 1:
                continue  # strength < 1: no strength makes one step enough (a cross rule)
            others = _others(endpoint, name, value)
            fields = [*others.items(), (name, value)]
            try:
                validate_params(endpoint, fields, list(spec.files))
                accepted = True
            except ApiError as error:
                assert error.field in (name, None), (name, value, error.message)
                accepted = False
            said = checker.is_valid(value)
            assert accepted == said, f"{endpoint} {name}={value!r}: server {accepted}, doc {said}"
    for name in spec.files:
        assert isinstance(FIELDS[name], FileField)
        assert body["encoding"][name]["contentType"] == "image/png, image/jpeg, image/webp"
    if not spec.files:
        content = doc["paths"][f"/{endpoint}"]["post"]["requestBody"]["content"]
        assert set(content) == {
            "multipart/form-data",
            "application/x-www-form-urlencoded",
            "application/json",
        }
        # JSON numbers may come as strings too, as validation reads them.
        steps = Draft202012Validator(content["application/json"]["schema"]["properties"]["steps"])
        assert steps.is_valid("8") and steps.is_valid(8) and not steps.is_valid(True)


def test_the_cross_field_rules_are_in_the_descriptions() -> None:
    doc = build_document(__version__, False)
    post = doc["paths"]["/text-to-image"]["post"]
    assert "iterations × batchSize must be at most 100" in post["description"]
    assert "width × height must be between 65536" in post["description"]
    i2i = doc["paths"]["/image-to-image"]["post"]["description"]
    assert "strength × steps must be at least 1" in i2i
    steps = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["steps"]
    assert steps["not"] == {"enum": [3, 9, 27, 36, 37, *range(101, 112)]}
    assert "3, 9, 27, 36, 37, 101" in steps["description"]


# --- real responses of every kind --------------------------------------------------------------


class Checked:
    """A server whose every response is checked against the document it serves."""

    def __init__(self, server: Server, headers: dict[str, str] | None = None) -> None:
        self.server = server
        self.headers = headers or {}
        got = server.get("/openapi.json", self.headers)
        assert got.status == 200, got.body
        self.api = OpenApi(json.loads(got.body))
        self.api.check("GET", "/openapi.json", got.status, got.headers, got.body)
        self.seen: set[tuple[str, str, int]] = set()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        got = self.server.request(method, path, body, {**self.headers, **(headers or {})})
        self.api.check(method, path, got.status, got.headers, got.body)
        self.seen.add((method, self.api.template(path), got.status))
        return got

    def form(
        self, endpoint: str, fields: dict[str, str], files: dict[str, bytes] | None = None
    ) -> Any:
        from helpers import multipart

        body, ctype = multipart(fields, files)
        return self.request("POST", f"/{endpoint}", body, {"Content-Type": ctype})

    def events(
        self, path: str, headers: dict[str, str] | None = None, final: bool = True
    ) -> list[Any]:
        with EventStream(self.server, path, {**self.headers, **(headers or {})}) as stream:
            if stream.status != 200:
                self.api.check("GET", path, stream.status, stream.headers, stream.body)
                return []
            self.api.check("GET", path, 200, stream.headers, b"")
            snapshot = lambda e: e.event == "snapshot"  # noqa: E731
            events = stream.rest() if final else stream.until(snapshot)
        for event in events:
            self.api.check_event(path, event.event, event.id, event.data)
        return events

    def wait(self, url: str, statuses: set[str], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.request("GET", url).json()
            if doc["status"] in statuses:
                return doc
            time.sleep(0.02)
        raise AssertionError(f"{url} never reached {statuses}")


def test_every_kind_of_real_response_validates_against_the_document(make_server) -> None:
    server = make_server(env={"SD_SIM_STEP_SECONDS": "0.03", "SD_SIM_LOAD_SECONDS": "0.3"})
    api = Checked(server)
    for path in ("/", "/docs", "/docs/docs.js", "/docs/docs.css", "/jobs", "/ui/", "/ui/app.js"):
        assert api.request("GET", path).status == 200
        assert api.request("HEAD", path).status == 200
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    page = api.request("GET", "/", headers=browser)
    assert page.headers["Content-Type"].startswith("text/html")
    assert (
        api.request("GET", "/", headers={**browser, "If-None-Match": page.headers["ETag"]}).status
        == 304
    )
    assert api.request("GET", "/ui/nope.js").status == 404
    assert api.request("OPTIONS", "/text-to-image").status == 204

    # Three jobs, one per body type; the first watched on its own stream from the start.
    first = api.form("text-to-image", {"prompt": "a fox", "iterations": "2", "steps": "4",
                                        "width": "256", "height": "256"})  # fmt: skip
    assert first.status == 303
    url = first.headers["Location"]
    stream_events = api.events(f"{url}/events")
    assert [e.event for e in stream_events][-1] == "complete"
    assert {"snapshot", "started", "progress", "image"} <= {e.event for e in stream_events}
    doc = api.wait(url, {"COMPLETE"})
    assert [image["position"] for image in doc["images"]] == [1, 2]
    as_json = api.request(
        "POST", "/text-to-image",
        json.dumps({"prompt": "a hare", "steps": 4, "width": 256, "height": "256"}).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    as_form = api.request(
        "POST", "/text-to-image", b"prompt=an+owl&steps=4&width=256&height=256&iterations=3",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert as_json.status == as_form.status == 303
    canceled = api.request("DELETE", as_form.headers["Location"]).json()
    assert canceled["status"] == "CANCELED"
    running = api.wait(as_json.headers["Location"], {"IN_PROGRESS", "COMPLETE"})
    assert running["status"] in ("IN_PROGRESS", "COMPLETE")
    for endpoint, fields, files in (
        ("image-to-image", {"prompt": "autumn", "steps": "4", "strength": "0.5"},
         {"image": png_bytes(256, 256)}),
        ("inpaint-image", {"steps": "4"},
         {"image": png_bytes(256, 256), "mask": mask_bytes(256, 256)}),
    ):  # fmt: skip
        posted = api.form(endpoint, fields, files)
        assert posted.status == 303, posted.body
        api.wait(posted.headers["Location"], {"COMPLETE"})

    # Images: 200 with its ETag, 304, HEAD, 404.
    image = api.request("GET", f"{url}/1.png")
    assert image.status == 200 and image.headers["Content-Type"] == "image/png"
    assert (
        api.request("GET", f"{url}/1.png", headers={"If-None-Match": image.headers["ETag"]}).status
        == 304
    )
    assert api.request("HEAD", f"{url}/2.png").status == 200
    assert api.request("GET", f"{url}/3.png").status == 404

    # The streams of a finished job, a reconnection after its end, every job's stream.
    final = api.events(f"{url}/events")
    assert [e.event for e in final] == ["complete"]
    assert api.events(f"{url}/events", {"Last-Event-ID": final[0].id}) == []
    snapshot = api.events("/events", final=False)
    assert snapshot[-1].event == "snapshot"
    assert api.events("/events?nope=1") == []
    assert api.request("POST", "/events/token").status == 200

    # The listing, and errors of every status the demo server can be made to give here.
    page = api.request("GET", "/jobs?limit=2&status=complete,canceled").json()
    assert len(page["items"]) == 2 and page["nextCursor"]
    api.request("GET", f"/jobs?cursor={page['nextCursor']}")
    assert api.request("GET", "/jobs?limit=0").status == 400
    # A digit int() cannot read ("²", U+00B2) was a 500 in both places.
    assert api.request("GET", "/jobs?limit=%C2%B2").status == 400
    assert api.events("/events?lastEventId=%C2%B2", final=False)[-1].event == "snapshot"
    assert api.form("text-to-image", {"prompt": "x", "steps": "3"}).status == 400
    assert api.form("text-to-image", {"prompt": "x", "step": "8"}).status == 400
    assert api.form("image-to-image", {"prompt": "x"}).status == 400
    assert api.request("GET", f"/text-to-image/{'0' * 32}").status == 404
    assert api.request("DELETE", f"/inpaint-image/{'0' * 32}").status == 404
    assert api.request("GET", f"/inpaint-image/{'0' * 32}/events").status == 404
    assert api.request("POST", "/text-to-image", b"x", {"Content-Type": "text/plain"}).status == 415
    too_large = api.request(
        "POST",
        "/text-to-image",
        b"{}",
        {"Content-Type": "application/json", "Content-Length": str(10**9)},
    )
    assert too_large.status == 413
    assert api.request("GET", "/", headers={"Expect": "teapot"}).status == 417
    assert (
        api.request(
            "POST",
            "/text-to-image",
            b"prompt=x&steps=5&steps=6",
            {"Content-Type": "application/x-www-form-urlencoded"},
        ).status
        == 400
    )
    statuses = {status for _, _, status in api.seen}
    assert statuses >= {200, 204, 303, 304, 400, 404, 413, 415, 417}


def test_responses_of_a_keyed_full_or_failing_server_validate(make_server, tmp_path: Path) -> None:
    key = {"Authorization": "Bearer s3cret"}
    server = make_server(
        args=["--api-key", "s3cret", "--max-queue", "1",
              "--inpaint-image-model", str(tmp_path / "missing.ckpt")],
        env={"SD_SIM_LOAD_SECONDS": "1.5", "SD_SIM_FAIL_AT_STEP": "1"},
        start=False,
    )  # fmt: skip
    server.start(wait=False)  # its readiness check would get 401
    wait_until(lambda: _answers(server, "/") == 401, "the keyed server to answer")
    api = Checked(server, key)
    assert api.api.doc["security"] == [{"bearerAuth": []}]
    bare = OpenApi(api.api.doc)
    for path in ("/", "/jobs", "/openapi.json", f"/text-to-image/{'0' * 32}"):
        refused = server.get(path)
        assert refused.status == 401
        bare.check("GET", path, refused.status, refused.headers, refused.body)
    for path in DOC_ASSETS:  # the page opens without the key; it asks for it
        opened = server.get(path)
        assert opened.status == 200
        bare.check("GET", path, 200, opened.headers, opened.body)
    token = api.request("POST", "/events/token").json()["token"]
    with EventStream(server, f"/events?token={token}") as stream:
        assert stream.status == 200
    first = api.form(
        "text-to-image", {"prompt": "a", "steps": "4", "width": "256", "height": "256"}
    )
    second = api.form(
        "text-to-image", {"prompt": "b", "steps": "4", "width": "256", "height": "256"}
    )
    third = api.form(
        "text-to-image", {"prompt": "c", "steps": "4", "width": "256", "height": "256"}
    )
    assert (first.status, second.status, third.status) == (303, 303, 429)
    missing = api.form(
        "inpaint-image", {}, {"image": png_bytes(256, 256), "mask": mask_bytes(256, 256)}
    )
    assert missing.status == 503
    failed = api.wait(first.headers["Location"], {"FAILED"})
    assert failed["error"]
    failed_events = api.events(f"{first.headers['Location']}/events")
    assert [e.event for e in failed_events] == ["failed"]


def _answers(server: Server, path: str) -> int | None:
    try:
        return server.get(path).status
    except OSError:
        return None


def test_a_full_disk_answer_validates(make_server) -> None:
    server = make_server(args=["--min-free-space", "1000000T"])
    api = Checked(server)
    assert api.form("text-to-image", {"prompt": "a"}).status == 507


# --- the docs page --------------------------------------------------------------------------


def test_the_docs_page_is_ours_offline_and_strict(make_server) -> None:
    for path in DOC_ASSETS:
        text = asset_file(path).read_text()
        # Nothing from elsewhere: no absolute URL, no protocol-relative one.
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path
    html = asset_file("/docs").read_text()
    assert set(re.findall(r'(?:src|href)="(/[^"]*)"', html)) == {
        "/docs/docs.js", "/docs/docs.css", "/openapi.json",
    }  # fmt: skip
    assert sorted(p.name for p in STATIC.iterdir()) == ["docs.css", "docs.js", "index.html"]
    script = asset_file("/docs/docs.js").read_text()
    assert "Authorization: `Bearer ${state.key}`" in script  # the key goes in the header
    assert "innerHTML" not in script  # text from the server is never parsed as markup
    server = make_server()
    page = server.get("/docs")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert page.body == asset_file("/docs").read_bytes()
    served = json.loads(server.get("/openapi.json").body)
    assert served == build_document(__version__, False)
