"""Property: whatever fields and file bytes a client sends, in whichever body format, the
answer is a 303 or a JSON 4xx error, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import Server, multipart

ENDPOINTS = ["text-to-image", "image-to-image", "inpaint-image"]
NAMES = [
    "prompt",
    "iterations",
    "batchSize",
    "steps",
    "seed",
    "width",
    "height",
    "guidanceScale",
    "eta",
    "strength",
    "image",
    "mask",
]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (width % 256, height % 256, 90)).save(buffer, "PNG")
    return buffer.getvalue()


SMALL_PNGS = [_png(256, 256), _png(320, 256), _png(64, 64)]

names = st.one_of(st.sampled_from(NAMES), st.text(min_size=0, max_size=12))
numbers_as_text = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "8", "24", "0x10", "1e3", "nan", "-0", "+7", "٣"]),
)
text_values = st.one_of(st.text(max_size=60), numbers_as_text)
file_bytes = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(SMALL_PNGS),
    st.tuples(st.sampled_from(SMALL_PNGS), st.integers(0, 400), st.binary(max_size=8)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]  # damaged somewhere
    ),
)
json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), numbers_as_text
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


# Values the endpoints accept, kept cheap to run: a plausible request mixes them with garbage.
PLAUSIBLE = {
    "prompt": st.text(min_size=1, max_size=40),
    "iterations": st.sampled_from(["1", "2"]),
    "batchSize": st.sampled_from(["1", "2"]),
    "steps": st.sampled_from(["2", "4", "3"]),
    "seed": st.integers(0, 2**32 - 1).map(str),
    "width": st.sampled_from(["256", "320", "500"]),
    "height": st.sampled_from(["256", "384"]),
    "guidanceScale": st.floats(0, 50).map(str),
    "eta": st.sampled_from(["0", "0.5", "1", "1.5"]),
    "strength": st.sampled_from(["0.5", "0.9", "1"]),
}
FILES = {"text-to-image": (), "image-to-image": ("image",), "inpaint-image": ("image", "mask")}


def _safe_name(name: str) -> str:
    # The test's multipart writer quotes names as is: keep its framing intact.
    return name.replace('"', "").replace("\r", "").replace("\n", "")


@st.composite
def plausible(draw: Any) -> tuple[str, list[tuple[str, Any]], dict[str, bytes]]:
    """The endpoint's own fields, each valid or not, and its files, intact or damaged."""
    endpoint = draw(st.sampled_from(ENDPOINTS))
    chosen = draw(st.sets(st.sampled_from(sorted(PLAUSIBLE)), max_size=6))
    if endpoint != "inpaint-image" and draw(st.booleans()):
        chosen.add("prompt")
    fields = [(name, draw(st.one_of(PLAUSIBLE[name], text_values))) for name in sorted(chosen)]
    good = st.sampled_from(SMALL_PNGS[:2])
    files = {name: draw(st.one_of(good, file_bytes)) for name in FILES[endpoint]}
    return endpoint, fields, files


@st.composite
def wild(draw: Any) -> tuple[str, list[tuple[str, Any]], dict[str, bytes]]:
    """Any names and values at all."""
    endpoint = draw(st.sampled_from(ENDPOINTS))
    fields = draw(st.lists(st.tuples(names, text_values), max_size=6))
    return endpoint, fields, draw(st.dictionaries(names, file_bytes, max_size=3))


@st.composite
def requests(draw: Any) -> tuple[str, bytes, str]:
    endpoint, fields, files = draw(st.one_of(plausible(), wild()))
    shape = "multipart" if files else draw(st.sampled_from(["multipart", "urlencoded", "json"]))
    if shape == "multipart":
        body, content_type = multipart(
            [(_safe_name(n), v) for n, v in fields],
            {_safe_name(n): d for n, d in files.items()},
        )
        return endpoint, body, content_type
    if shape == "urlencoded":
        return endpoint, urlencode(fields).encode(), "application/x-www-form-urlencoded"
    if draw(st.booleans()):
        fields += draw(st.lists(st.tuples(names, json_values), max_size=3))
    return endpoint, json.dumps(dict(fields)).encode(), "application/json"


def test_no_request_gets_a_5xx_and_the_server_keeps_serving(shared_server: Server) -> None:
    accepted: list[str] = []

    # Inside the test, so that the end of the test runs after every example: it waits for the
    # jobs the examples queued, which may fail inside the server long after their 303.
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request=requests())
    def one_request(request: tuple[str, bytes, str]) -> None:
        endpoint, body, content_type = request
        logged = len(shared_server.log())
        resp = shared_server.request("POST", f"/{endpoint}", body, {"Content-Type": content_type})
        assert resp.status < 500, resp.body
        assert resp.headers["Content-Type"].startswith("application/json")
        doc = resp.json()
        if resp.status == 303:
            assert doc["resultUrl"] == resp.headers["Location"]
            accepted.append(resp.headers["Location"])
        else:
            assert 400 <= resp.status < 500
            assert set(doc) == {"error"}
            assert isinstance(doc["error"]["code"], str)
            assert isinstance(doc["error"]["message"], str)
        shared_server.assert_serving(since=logged)

    one_request()
    assert accepted, "no example was a valid request: the strategies lost their valid half"
    for url in accepted:
        shared_server.wait_status(url, {"COMPLETE", "FAILED", "CANCELED"}, timeout=120)
    shared_server.assert_serving()
