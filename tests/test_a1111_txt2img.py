"""AUTOMATIC1111's POST /sdapi/v1/txt2img against a real demo server: the answer's shape,
`info` and its infotexts (each the image's own `parameters` chunk), every request an ordinary
job (listed, the same id and pixels as the same settings through POST /text-to-image), PLMS
through txt2img.py's --plms, what is not honoured named, and refusals in its shapes."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from helpers import Server, free_port
from pngparts import chunks

INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "seed", "all_seeds", "subseed", "all_subseeds",
    "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size", "denoising_strength",
    "sd_model_name", "sd_model_hash", "infotexts", "index_of_first_image", "job_timestamp",
    "extra_generation_params",
}  # fmt: skip


def post(server: Server, path: str, doc: Any) -> Any:
    return server.request(
        "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}, timeout=60
    )


def parameters_chunk(png: bytes) -> str:
    for kind, data in chunks(png):
        name, _, rest = data.partition(b"\0")
        if name == b"parameters":
            assert kind == b"tEXt"
            return rest.decode("latin-1")
    raise AssertionError("no parameters chunk")


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    return shared_server


def test_a_batch_answers_base64_pngs_with_info_and_infotexts_of_the_pngs(server: Server) -> None:
    resp = post(
        server,
        "/sdapi/v1/txt2img",
        {"prompt": "a lighthouse", "steps": 8, "seed": 7, "batch_size": 2, "cfg_scale": 6},
    )
    assert resp.status == 200, resp.body
    doc = resp.json()
    assert set(doc) == {"images", "parameters", "info"}
    assert doc["parameters"]["seed"] == 7 and doc["parameters"]["batch_size"] == 2
    info = json.loads(doc["info"])
    assert set(info) >= INFO_KEYS
    assert info["all_seeds"] == [7, 7] and info["sampler_name"] == "DDIM"
    assert info["cfg_scale"] == 6.0 and info["extra_generation_params"] == {}
    assert info["sd_model_hash"] and len(info["sd_model_hash"]) == 10
    pngs = [base64.b64decode(image) for image in doc["images"]]
    assert len(pngs) == 2 and all(not image.startswith("data:") for image in doc["images"])
    assert [parameters_chunk(png) for png in pngs] == info["infotexts"]
    assert "Model hash: " + info["sd_model_hash"] in info["infotexts"][0]
    # An ordinary job: listed, its images served as the PNGs answered.
    item = server.get("/jobs?limit=1").json()["items"][0]
    assert item["status"] == "COMPLETE" and item["params"]["guidanceScale"] == 6.0
    assert [server.get(url).body for url in item["imageUrls"]] == pngs


def test_the_same_settings_through_both_apis_are_the_same_job_and_pixels(server: Server) -> None:
    native = server.post_form(
        "text-to-image",
        {"prompt": "same on both", "steps": "8", "seed": "99", "guidanceScale": "7.5"},
    )
    job = server.wait_status(native.headers["Location"], {"COMPLETE"})
    before = job_ids(server)
    assert native.headers["Location"].rsplit("/", 1)[1] in before
    resp = post(
        server,
        "/sdapi/v1/txt2img",
        {"prompt": "same on both", "steps": 8, "seed": 99, "cfg_scale": 7.5, "eta": 0},
    )
    assert resp.status == 200, resp.body
    ours = server.get(job["imageUrls"][0]).body
    assert base64.b64decode(resp.json()["images"][0]) == ours
    # The same job answered: no job was made for the second request.
    assert job_ids(server) == before
    # Settings that differ make a job of their own (so the listing would show one).
    other = post(server, "/sdapi/v1/txt2img", {"prompt": "same on both", "steps": 8, "seed": 98})
    assert other.status == 200 and len(job_ids(server)) == len(before) + 1


def job_ids(server: Server) -> list[str]:
    items = server.get("/jobs?limit=200").json()["items"]
    assert len(items) < 200
    return [item["id"] for item in items]


def test_seed_minus_one_is_a_random_seed_reported_back(server: Server) -> None:
    resp = post(server, "/sdapi/v1/txt2img", {"prompt": "random", "steps": 4, "seed": -1})
    info = json.loads(resp.json()["info"])
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]
    assert f"Seed: {info['seed']}," in info["infotexts"][0]


def test_plms_runs_the_script_with_plms_and_other_samplers_are_named(server: Server) -> None:
    resp = post(server, "/sdapi/v1/txt2img", {"prompt": "plms", "steps": 8, "sampler_name": "PLMS"})
    info = json.loads(resp.json()["info"])
    assert info["sampler_name"] == "PLMS" and "Sampler: PLMS" in info["infotexts"][0]
    item = server.get("/jobs?limit=1").json()["items"][0]
    assert item["params"]["plms"] == 1
    log = (server.output / "text-to-image" / item["id"] / "job.log").read_text()
    assert "PLMS Sampler" in log and "--plms" in log
    resp = post(
        server,
        "/sdapi/v1/txt2img",
        {
            "prompt": "euler",
            "steps": 8,
            "sampler_name": "Euler a",
            "negative_prompt": "blurry",
            "enable_hr": True,
            "restore_faces": True,
            "styles": ["noir"],
        },
    )
    info = json.loads(resp.json()["info"])
    note = info["extra_generation_params"]["Not honoured"]
    for named in ("negative prompt", '"blurry"', "Euler a", "hires fix", "face restoration"):
        assert named in note
    assert "styles" in note and info["sampler_name"] == "DDIM"
    assert "Not honoured: " in info["infotexts"][0]
    assert parameters_chunk(base64.b64decode(resp.json()["images"][0])) == info["infotexts"][0]
    assert "not honoured: negative prompt" in server.log()


def test_send_images_false_answers_no_images(server: Server) -> None:
    resp = post(server, "/sdapi/v1/txt2img", {"prompt": "quiet", "steps": 4, "send_images": False})
    assert resp.status == 200 and resp.json()["images"] == []


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"prompt": "x", "steps": "many"}, ["body", "steps"]),
        ({"prompt": "x", "steps": 0}, ["body", "steps"]),
        ({"prompt": "x", "steps": 36}, ["body", "steps"]),
        ({"prompt": "x", "width": 500}, ["body", "width"]),
        ({"prompt": "x", "cfg_scale": "loud"}, ["body", "cfg_scale"]),
        ({"prompt": "x", "seed": -2}, ["body", "seed"]),
        ({"prompt": "x", "batch_size": 9}, ["body", "batch_size"]),
        ({"prompt": ""}, ["body", "prompt"]),
        ({"prompt": "x", "styles": "noir"}, ["body", "styles"]),
    ],
)
def test_bad_values_are_fastapis_422(server: Server, body: dict[str, Any], loc: list[str]) -> None:
    resp = post(server, "/sdapi/v1/txt2img", body)
    assert resp.status == 422, resp.body
    (detail,) = resp.json()["detail"]
    assert detail["loc"] == loc and detail["msg"] and detail["type"]


def test_scripts_are_refused_as_automatic1111_refuses_them(server: Server) -> None:
    resp = post(server, "/sdapi/v1/txt2img", {"prompt": "x", "script_name": "xyz plot"})
    assert resp.status == 422
    assert resp.json() == {
        "error": "HTTPException",
        "detail": "Script 'xyz plot' not found",
        "body": "",
        "errors": "422: Script 'xyz plot' not found",
    }
    resp = post(
        server, "/sdapi/v1/txt2img", {"prompt": "x", "alwayson_scripts": {"ControlNet": {}}}
    )
    assert resp.status == 422 and set(resp.json()) == {"error", "detail", "body", "errors"}
    # Empty and null are what clients send when they use none.
    ok = post(
        server,
        "/sdapi/v1/txt2img",
        {"prompt": "y", "steps": 2, "script_name": None, "alwayson_scripts": {}},
    )
    assert ok.status == 200


def test_not_json_and_not_an_object_are_422(server: Server) -> None:
    resp = server.request(
        "POST", "/sdapi/v1/txt2img", b"{nope", {"Content-Type": "application/json"}
    )
    assert resp.status == 422 and resp.json()["detail"][0]["type"] == "value_error.jsondecode"
    resp = post(server, "/sdapi/v1/txt2img", [1, 2])
    assert resp.status == 422 and resp.json()["detail"][0]["loc"] == ["body"]
    server.assert_serving()


def test_parameters_echo_only_the_known_fields(server: Server) -> None:
    body = {"prompt": "echo", "steps": 2, "auth": "user:secret", "url": "http://x"}
    resp = post(server, "/sdapi/v1/txt2img", body)
    assert resp.status == 200, resp.body
    parameters = resp.json()["parameters"]
    assert parameters["prompt"] == "echo" and parameters["steps"] == 2
    assert "auth" not in parameters and "url" not in parameters
    assert b"secret" not in resp.body


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "x", "styles": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "x", "a": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
        b'{"prompt": "x", "steps": ' + b"9" * 4000 + b"}",
        b'{"prompt": "x", "seed": -' + b"1" * 4299 + b"}",
    ],
    ids=["nested lists", "nested objects", "4000 digits", "4299 digits"],
)
def test_hostile_json_is_a_422_not_a_500(server: Server, raw: bytes) -> None:
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"):
        resp = server.request("POST", path, raw, {"Content-Type": "application/json"})
        assert resp.status == 422, (path, resp.status, resp.body[:300])
        assert resp.json()["detail"][0]["type"] == "value_error.jsondecode"
    server.assert_serving()


def test_a_compressed_body_is_refused_as_our_api_refuses_it(server: Server) -> None:
    resp = server.request(
        "POST",
        "/sdapi/v1/txt2img",
        b'{"prompt": "x"}',
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 422, resp.body
    assert "Content-Encoding" in resp.json()["detail"][0]["msg"]


def test_a_503_keeps_its_retry_after(make_server) -> None:
    """Redis down (--broker): our 503 broker_unavailable in AUTOMATIC1111's shape, with the
    Retry-After it carries."""
    server = make_server(args=["--broker", f"redis://127.0.0.1:{free_port()}/0"])
    resp = post(server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2})
    assert resp.status == 503, resp.body
    assert resp.headers.get("Retry-After") == "5"
    assert resp.json()["error"] == "broker_unavailable" and "Redis" in resp.json()["detail"]
