"""The web page's serving (no browser needed): `GET /` answers browsers with the page and
every other client with the JSON index, the page's files are only its own, they need no API
key while the API still does, and the field table written into the page is the server's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from sd_rest.api.page import prefers_html
from sd_rest.endpoints import ENDPOINTS
from sd_rest.fields import FIELDS, NumberField, TextField

from helpers import Response, Server, wait_until

# What Chromium and Firefox send when they navigate to a page.
BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
)
KEY = "page-test-key"


def answer(server: Server, path: str) -> Response | None:
    """The answer, or None while the server is not listening yet."""
    try:
        return server.get(path)
    except OSError:
        return None


def page_data(body: bytes) -> dict:
    match = re.search(rb'<script type="application/json" id="page-data">(.*?)</script>', body)
    assert match, body[:500]
    return json.loads(match.group(1))


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("application/xhtml+xml", True),
        ("text/html, application/json", True),  # a tie goes to the page
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0", False),
        ("text/html;q=bogus", False),
        ("*/*", False),  # curl, fetch, most libraries
        ("", False),
        ("application/json", False),
        ("text/*", False),
    ],
)
def test_accept_decides(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


def test_browsers_get_the_page_others_the_index(shared_server: Server) -> None:
    page = shared_server.get("/", {"Accept": BROWSER_ACCEPT})
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.headers["Vary"] == "Accept"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert b'<script type="module" src="/ui/app.js">' in page.body
    for accept in (None, "*/*", "application/json"):
        index = shared_server.get("/", {"Accept": accept} if accept else None)
        assert index.status == 200
        assert index.headers["Content-Type"].startswith("application/json")
        assert index.headers["Vary"] == "Accept"
        assert index.json()["name"] == "sd-rest"
    assert shared_server.get("/ui/").body == page.body
    head = shared_server.request("HEAD", "/", headers={"Accept": BROWSER_ACCEPT})
    assert (head.status, head.body) == (200, b"")


def test_page_files_are_only_its_own(shared_server: Server) -> None:
    for name, ctype in [
        ("app.js", "text/javascript"),
        ("style.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
    ]:
        response = shared_server.get(f"/ui/{name}")
        assert response.status == 200, name
        assert response.headers["Content-Type"].startswith(ctype)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        again = shared_server.get(f"/ui/{name}", {"If-None-Match": response.headers["ETag"]})
        assert (again.status, again.body) == (304, b"")
    for path in [
        "/ui/nope.js",
        "/ui/../page.py",
        "/ui/%2e%2e/page.py",
        "/ui/..%2fpage.py",
        "/ui/sub/app.js",
        "/ui/APP.JS",
        "/ui",
    ]:
        response = shared_server.get(path)
        assert response.status == 404, path
        assert response.json()["error"]["code"] == "not_found"
    # Not a way to post anything: only GET and HEAD reach the page's files.
    post = shared_server.request("POST", "/ui/app.js", b"")
    assert post.status == 405 and post.headers["Allow"] == "GET,HEAD"
    assert post.json()["error"]["code"] == "method_not_allowed"


def test_the_page_carries_the_field_table(shared_server: Server) -> None:
    data = page_data(shared_server.get("/ui/").body)
    assert data["keyRequired"] is False
    assert set(data["fields"]) == set(FIELDS)
    for name, field in FIELDS.items():
        shown = data["fields"][name]
        if isinstance(field, NumberField):
            assert (shown["low"], shown["high"], shown["multiple"]) == (
                field.low,
                field.high,
                field.multiple,
            )
            assert shown["kind"] == ("int" if field.kind is int else "float")
        elif isinstance(field, TextField):
            assert shown["maxLength"] == field.max_length
    for name, endpoint in ENDPOINTS.items():
        assert data["endpoints"][name]["defaults"] == dict(endpoint.defaults)
        assert data["endpoints"][name]["files"] == list(endpoint.files)


def test_with_a_key_the_page_is_open_and_the_api_is_not(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(["--api-key", KEY], start=False)
    server.start(wait=False)
    # wait_ready's GET / needs the key: wait for the page instead, which does not.
    page = wait_until(lambda: answer(server, "/ui/"), "the page")
    assert page.status == 200
    assert page_data(page.body)["keyRequired"] is True
    assert server.get("/", {"Accept": BROWSER_ACCEPT}).status == 200
    assert server.get("/ui/app.js").status == 200
    # Everything else still wants the key, the JSON index at the same path included.
    assert server.get("/", {"Accept": "application/json"}).status == 401
    assert server.get("/jobs").status == 401
    assert server.get("/ui/nope.js").status == 404  # nothing there, key or not
    keyed = server.get("/", {"Accept": "*/*", "Authorization": f"Bearer {KEY}"})
    assert keyed.status == 200
    assert keyed.json()["name"] == "sd-rest"
