"""Malformed requests, one table: each gets its status, its error code and the field at fault,
always in the one JSON error shape, and never a 5xx. One real server answers them all."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sd_rest.images.uploads import MAX_UPLOAD_BYTES

from helpers import Server, mask_bytes, multipart, png_bytes, raw_request

T2I, I2I, INPAINT = "/text-to-image", "/image-to-image", "/inpaint-image"
PROMPT = ("prompt", "a lighthouse")
UNKNOWN_ID = "0123456789abcdef" * 2
_NO_JSON = object()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header states `width`×`height`, with next to no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def encoded(image_format: str, size: tuple[int, int] = (512, 512)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 90, 160)).save(buffer, image_format)
    return buffer.getvalue()


def cursor_of_text(text: str) -> str:
    """A cursor as this server made them before they were signed: unpadded base64 of JSON."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def cursor_of(doc: Any) -> str:
    return cursor_of_text(json.dumps(doc))


IMAGE = png_bytes(512, 512)
MASK = mask_bytes(512, 512)


def multipart_with_repeats(parts: list[tuple[str, bytes, str | None]]) -> bytes:
    """A multipart body that may repeat a name (helpers.multipart takes files as a dict)."""
    out = b""
    for name, data, filename in parts:
        disposition = f'name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--repeats\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode()
        out += data + b"\r\n"
    return out + b"--repeats--\r\n"


def raw_post(path: str, headers: str, body: bytes = b"") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n\r\n".encode() + body


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    code: str
    field: str | None = None
    path: str = T2I
    method: str = "POST"
    form: list[tuple[str, str]] | None = None  # multipart text fields
    files: dict[str, bytes] | None = None  # multipart files
    json: Any = _NO_JSON  # a JSON body instead
    body: bytes | None = None  # a body as is, with `content_type`
    content_type: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    raw: bytes | None = None  # the whole request as is
    says: str = ""  # the message must contain this


CASES = [
    # --- prompt --------------------------------------------------------------------------
    Case("prompt missing", 400, "missing_field", "prompt", form=[("steps", "8")]),
    Case("prompt empty", 400, "invalid_field", "prompt", form=[("prompt", "")]),
    Case("prompt blank", 400, "invalid_field", "prompt", form=[("prompt", " \t\n ")]),
    Case("prompt too long", 400, "invalid_field", "prompt", form=[("prompt", "x" * 1001)]),
    Case("prompt NUL", 400, "invalid_field", "prompt", json={"prompt": "a\u0000b"}),
    Case("prompt lone surrogate", 400, "invalid_field", "prompt", json={"prompt": "a\ud800"}),
    Case("prompt a number", 400, "invalid_field", "prompt", json={"prompt": 5}),
    Case("prompt null", 400, "invalid_field", "prompt", json={"prompt": None}),
    Case("prompt a list", 400, "invalid_field", "prompt", json={"prompt": ["a"]}),
    Case("prompt as a file", 400, "invalid_field", "prompt", files={"prompt": b"a cat"}),
    Case("prompt twice", 400, "duplicate_field", "prompt", form=[PROMPT, PROMPT]),
    Case(
        "prompt twice in JSON",
        400,
        "duplicate_field",
        "prompt",
        body=b'{"prompt": "a", "prompt": "b"}',
        content_type="application/json",
    ),
    Case(
        "prompt over 64 KiB",
        413,
        "too_large",
        "prompt",
        form=[("prompt", "x" * 70_000)],
    ),
    # --- names that are not fields: typos, paths, settings ----------------------------------
    Case("typo step", 400, "unknown_field", "step", form=[PROMPT, ("step", "10")], says="steps"),
    Case("outdir", 400, "unknown_field", "outdir", form=[PROMPT, ("outdir", "/tmp")]),
    Case("ckpt", 400, "unknown_field", "ckpt", json={"prompt": "a", "ckpt": "/etc/passwd"}),
    Case("flag as name", 400, "unknown_field", "--outdir", form=[PROMPT, ("--outdir", "/")]),
    Case("unknown file", 400, "unknown_field", "config", form=[PROMPT], files={"config": b"x"}),
    # --- numbers -------------------------------------------------------------------------
    Case("steps 0", 400, "invalid_field", "steps", form=[PROMPT, ("steps", "0")]),
    Case("steps 251", 400, "invalid_field", "steps", form=[PROMPT, ("steps", "251")]),
    Case(
        "steps 3 crash DDIM",
        400,
        "invalid_field",
        "steps",
        form=[PROMPT, ("steps", "3")],
        says="2 or 4",
    ),
    Case("steps text", 400, "invalid_field", "steps", form=[PROMPT, ("steps", "ten")]),
    Case("steps fraction", 400, "invalid_field", "steps", form=[PROMPT, ("steps", "1.5")]),
    Case("steps boolean", 400, "invalid_field", "steps", json={"prompt": "a", "steps": True}),
    Case("steps 40 digits", 400, "invalid_field", "steps", form=[PROMPT, ("steps", "9" * 40)]),
    Case("seed negative", 400, "invalid_field", "seed", form=[PROMPT, ("seed", "-1")]),
    Case("seed 2**32", 400, "invalid_field", "seed", form=[PROMPT, ("seed", str(2**32))]),
    Case("width not /64", 400, "invalid_field", "width", form=[PROMPT, ("width", "500")]),
    Case(
        "area too small",
        400,
        "invalid_field",
        "width",
        form=[PROMPT, ("width", "64"), ("height", "64")],
    ),
    Case("height 4096", 400, "invalid_field", "height", form=[PROMPT, ("height", "4096")]),
    Case(
        "guidance NaN",
        400,
        "invalid_field",
        "guidanceScale",
        form=[PROMPT, ("guidanceScale", "nan")],
    ),
    Case(
        "guidance infinite",
        400,
        "invalid_field",
        "guidanceScale",
        body=b'{"prompt": "a", "guidanceScale": 1e999}',
        content_type="application/json",
    ),
    Case("eta 2", 400, "invalid_field", "eta", form=[PROMPT, ("eta", "2")]),
    Case("iterations 51", 400, "invalid_field", "iterations", form=[PROMPT, ("iterations", "51")]),
    Case("batchSize 9", 400, "invalid_field", "batchSize", form=[PROMPT, ("batchSize", "9")]),
    Case(
        "too many images",
        400,
        "invalid_field",
        "iterations",
        form=[PROMPT, ("iterations", "50"), ("batchSize", "8")],
    ),
    # --- bodies ----------------------------------------------------------------------------
    Case("JSON array", 400, "invalid_json", json=[["prompt", "a"]]),
    Case("JSON broken", 400, "invalid_json", body=b'{"prompt": ', content_type="application/json"),
    Case(
        "JSON nested deep",
        400,
        "invalid_json",
        body=b"[" * 20_000 + b"]" * 20_000,
        content_type="application/json",
    ),
    Case(
        "JSON over 64 KiB",
        413,
        "too_large",
        json={"prompt": "a", "pad": "x" * 70_000},
    ),
    Case("text/plain", 415, "unsupported_media_type", body=b"prompt=a", content_type="text/plain"),
    Case(
        "gzip body",
        415,
        "unsupported_media_type",
        body=zlib.compress(b'{"prompt": "a"}'),
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    ),
    Case(
        "url-encoded latin-1",
        415,
        "unsupported_media_type",
        body=b"prompt=caf%E9",
        content_type="application/x-www-form-urlencoded; charset=latin-1",
    ),
    Case(
        "url-encoded bad UTF-8",
        400,
        "invalid_field",
        "prompt",
        body=b"prompt=caf%E9",
        content_type="application/x-www-form-urlencoded",
    ),
    Case(
        "multipart bad UTF-8",
        400,
        "invalid_field",
        "prompt",
        body=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n\xff\xfe\r\n--b--\r\n',
        content_type="multipart/form-data; boundary=b",
    ),
    Case(
        "multipart unknown charset",
        400,
        "invalid_field",
        "prompt",
        body=(
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n'
            b"Content-Type: text/plain; charset=bogus\r\n\r\nhi\r\n--b--\r\n"
        ),
        content_type="multipart/form-data; boundary=b",
    ),
    Case(
        "multipart base64 part",
        400,
        "invalid_field",
        "prompt",
        body=(
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\nYSBjYXQ=\r\n--b--\r\n"
        ),
        content_type="multipart/form-data; boundary=b",
    ),
    Case(
        "multipart no boundary",
        400,
        "invalid_body",
        body=b"prompt=a",
        content_type="multipart/form-data",
    ),
    Case(
        "multipart unterminated",
        400,
        "invalid_body",
        body=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n',
        content_type="multipart/form-data; boundary=b",
    ),
    Case(
        "multipart part without name",
        400,
        "invalid_body",
        body=b"--b\r\nContent-Disposition: form-data\r\n\r\na cat\r\n--b--\r\n",
        content_type="multipart/form-data; boundary=b",
    ),
    Case("33 parts", 400, "too_many_fields", form=[(f"f{n}", "x") for n in range(33)]),
    Case("empty body", 400, "missing_field", "prompt", body=b""),
    Case(
        "declared 100 MB",
        413,
        "too_large",
        raw=raw_post(
            T2I, "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000"
        ),
    ),
    Case(
        "Expect other than continue",
        417,
        "expectation_failed",
        form=[PROMPT],
        headers={"Expect": "x"},
    ),
    # --- uploads -------------------------------------------------------------------------
    Case("image missing", 400, "missing_field", "image", path=I2I, form=[PROMPT]),
    Case("image as text", 400, "invalid_field", "image", path=I2I, form=[PROMPT, ("image", "x")]),
    Case(
        "image not an image",
        415,
        "unsupported_media_type",
        "image",
        path=I2I,
        form=[PROMPT],
        files={"image": b"GIF89a not accepted"},
    ),
    Case(
        "image truncated",
        400,
        "invalid_file",
        "image",
        path=I2I,
        form=[PROMPT],
        files={"image": IMAGE[: len(IMAGE) // 2]},
    ),
    Case(
        "image bomb",
        400,
        "image_too_large",
        "image",
        path=I2I,
        form=[PROMPT],
        files={"image": png_claiming(20_000, 20_000)},
    ),
    Case(
        "image absurd side",
        400,
        "image_too_large",
        "image",
        path=I2I,
        form=[PROMPT],
        files={"image": png_claiming(100_000, 1)},
    ),
    Case(
        "image too small",
        400,
        "invalid_field",
        "image",
        path=I2I,
        form=[PROMPT],
        files={"image": png_bytes(100, 100)},
    ),
    Case(
        "image over 20 MiB",
        413,
        "too_large",
        "image",
        path=I2I,
        form=[PROMPT],
        files={"image": b"\0" * (MAX_UPLOAD_BYTES + 1)},
    ),
    Case(
        "image twice",
        400,
        "duplicate_field",
        "image",
        path=I2I,
        body=multipart_with_repeats([("prompt", b"a cat", None), *[("image", IMAGE, "a.png")] * 2]),
        content_type="multipart/form-data; boundary=repeats",
    ),
    Case(
        "width on image-to-image",
        400,
        "unknown_field",
        "width",
        path=I2I,
        form=[PROMPT, ("width", "512")],
        files={"image": IMAGE},
    ),
    Case(
        "strength 1",
        400,
        "invalid_field",
        "strength",
        path=I2I,
        form=[PROMPT, ("strength", "1")],
        files={"image": IMAGE},
    ),
    Case(
        "strength × steps < 1",
        400,
        "invalid_field",
        "strength",
        path=I2I,
        form=[PROMPT, ("strength", "0.1"), ("steps", "8")],
        files={"image": IMAGE},
    ),
    Case(
        "prompt on inpaint",
        400,
        "unknown_field",
        "prompt",
        path=INPAINT,
        form=[PROMPT],
        files={"image": IMAGE, "mask": MASK},
    ),
    Case("mask missing", 400, "missing_field", "mask", path=INPAINT, files={"image": IMAGE}),
    Case(
        "mask of another ratio",
        400,
        "invalid_field",
        "mask",
        path=INPAINT,
        files={"image": IMAGE, "mask": mask_bytes(512, 256)},
    ),
    Case(
        "inpaint steps 9 crash DDIM",
        400,
        "invalid_field",
        "steps",
        path=INPAINT,
        form=[("steps", "9")],
        files={"image": IMAGE, "mask": MASK},
        says="8 or 10",
    ),
    # --- GET /jobs (issue 17: each was a 500, or a forged cursor a 200) ----------------------
    Case(
        "limit of 5,000 digits",
        400,
        "invalid_field",
        "limit",
        path=f"/jobs?limit={'9' * 5000}",
        method="GET",
    ),
    Case(
        "cursor: endpoint a list",
        400,
        "invalid_field",
        "cursor",
        path=f"/jobs?cursor={cursor_of(['0x1.0p+0', ['text-to-image'], UNKNOWN_ID])}",
        method="GET",
    ),
    Case(
        "cursor: endpoint an object",
        400,
        "invalid_field",
        "cursor",
        path=f"/jobs?cursor={cursor_of(['0x1.0p+0', {}, UNKNOWN_ID])}",
        method="GET",
    ),
    Case(
        "cursor: 3,000 [",
        400,
        "invalid_field",
        "cursor",
        path=f"/jobs?cursor={cursor_of_text('[' * 3000)}",
        method="GET",
    ),
    Case(
        "cursor: well-formed, not signed",
        400,
        "invalid_field",
        "cursor",
        path=f"/jobs?cursor={cursor_of(['0x1.0p+0', 'text-to-image', UNKNOWN_ID])}",
        method="GET",
    ),
    # --- routes ----------------------------------------------------------------------------
    Case("unknown path", 404, "not_found", path="/nope", method="GET"),
    Case("unknown job", 404, "not_found", path=f"{T2I}/{UNKNOWN_ID}", method="GET"),
    Case("cancel unknown job", 404, "not_found", path=f"{T2I}/{UNKNOWN_ID}", method="DELETE"),
    Case("id in capitals", 404, "not_found", path=f"{T2I}/{UNKNOWN_ID.upper()}", method="GET"),
    Case("PUT", 405, "method_not_allowed", method="PUT", body=b""),
    Case("GET a POST route", 405, "method_not_allowed", method="GET"),
    # --- HTTP itself ---------------------------------------------------------------------
    Case("not HTTP", 400, "bad_request", raw=b"GARBAGE\r\n\r\n"),
    Case(
        "header line over 8 KiB",
        400,
        "bad_request",
        raw=b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    ),
    Case(
        "101 headers",
        400,
        "bad_request",
        raw=b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: a\r\n" % n for n in range(101))
        + b"\r\n",
    ),
    Case("URL over 8 KiB", 400, "bad_request", raw=b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"),
    Case(
        "bad Content-Length",
        400,
        "bad_request",
        raw=raw_post(T2I, "Content-Type: application/json\r\nContent-Length: ten", b"{}"),
    ),
]


def send(server: Server, case: Case) -> Any:
    if case.raw is not None:
        return raw_request(server, case.raw)
    headers = dict(case.headers)
    body: bytes | None
    if case.json is not _NO_JSON:
        body, headers["Content-Type"] = json.dumps(case.json).encode(), "application/json"
    elif case.body is not None:
        body = case.body
        if case.content_type is not None:
            headers["Content-Type"] = case.content_type
    elif case.form is not None or case.files is not None:
        body, headers["Content-Type"] = multipart(case.form, case.files)
    else:
        body = None
    return server.request(case.method, case.path, body, headers)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_malformed_request(shared_server: Server, case: Case) -> None:
    logged = len(shared_server.log())
    response = send(shared_server, case)
    assert response.status == case.status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == case.code, error
    assert error.get("field") == case.field, error
    assert isinstance(error["message"], str) and error["message"]
    assert case.says in error["message"]
    if case.status == 405:
        assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]
    shared_server.assert_serving(since=logged)


def test_one_server_answers_the_whole_table_in_a_row(make_server) -> None:
    """Every row, one after the other, on a server of this test's own: each gets its answer
    (whatever the rows before it did to the server) and the server is still serving after
    the last, with nothing in its log."""
    server: Server = make_server()

    def outcome(response: Any) -> tuple[int, str | None, str | None]:
        error = response.json().get("error", {}) if response.body else {}
        return response.status, error.get("code"), error.get("field")

    answers = {case.id: outcome(send(server, case)) for case in CASES}
    assert answers == {case.id: (case.status, case.code, case.field) for case in CASES}
    server.assert_serving()


@pytest.mark.parametrize(
    ("name", "data", "declared"),
    [
        ("JPEG as image/jpeg", encoded("JPEG"), "image/jpeg"),
        ("WebP as octet-stream", encoded("WEBP"), "application/octet-stream"),
        ("PNG labelled JPEG", IMAGE, "image/jpeg"),
        ("PNG labelled text", IMAGE, "text/plain"),
    ],
)
def test_upload_type_comes_from_its_bytes(
    shared_server: Server, name: str, data: bytes, declared: str
) -> None:
    body, content_type = multipart(
        [("prompt", name), ("steps", "2")], {"image": data}, {"image": declared}
    )
    response = shared_server.request("POST", I2I, body, {"Content-Type": content_type})
    assert response.status == 303, response.body


def test_mask_of_the_same_ratio_is_resized(shared_server: Server) -> None:
    response = shared_server.post_form(
        "inpaint-image", {"steps": "2"}, {"image": IMAGE, "mask": mask_bytes(256, 256)}
    )
    assert response.status == 303, response.body
    done = shared_server.wait_status(response.headers["Location"], {"COMPLETE", "FAILED"})
    assert done["status"] == "COMPLETE", done


def test_an_unexpected_fault_is_a_json_500_with_a_logged_request_id(
    make_server, tmp_path: Path
) -> None:
    """A real fault on the server's side, not the client's: the output folder is broken (a
    file stands where the endpoint's folder must be created), so storing the job fails."""
    server = make_server()
    (server.output / "text-to-image").write_text("not a folder")
    response = server.post_form("text-to-image", {"prompt": "cannot be stored", "steps": "2"})
    assert response.status == 500, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "internal_error"
    request_id = error["requestId"]
    assert len(request_id) == 16 and request_id in error["message"]
    log = server.log()
    assert f"request {request_id} (POST /text-to-image) failed" in log
    assert "Traceback" in log.split(request_id, 1)[1]
    assert server.get("/").status == 200
