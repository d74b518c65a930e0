"""Metadata in every published PNG, end to end: AUTOMATIC1111's infotext reads back every
field of the request; the sd-rest chunk makes the image again, byte for byte, by running the
script it names with its flags; the pixels are the script's; `images` in the status. The
checkpoint's digest and the fork's commit (provenance.py): learnt once, in the background,
never waited for; a metadata failure never loses or holds back an image."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sd_rest import __version__
from sd_rest.endpoints import ENDPOINTS
from sd_rest.jobs.manager import JobManager
from sd_rest.runs.provenance import Provenance, read_fork_commit
from sd_rest.runs.publisher import ImagePublisher
from sd_rest.scripts import RunFolders, plan_run
from sd_rest.state.jobs import ImageRecord, Status

from helpers import DEMO_MODELS, FAST_SIMULATOR, SIMULATOR, job_folder, mask_bytes, png_bytes
from inprocess import settings, text_params, until
from pngparts import parse_infotext, pixels, text_chunks, without_text

OURS = {"parameters", "sd-rest"}

REQUESTS: dict[str, tuple[dict[str, str], dict[str, bytes]]] = {
    "text-to-image": (
        {
            "prompt": 'a fox, at dusk: "red"\nsecond line, 猫',
            "iterations": "2",
            "batchSize": "2",
            "steps": "6",
            "seed": "123",
            "width": "256",
            "height": "320",
            "guidanceScale": "9",
            "eta": "0.5",
        },
        {},
    ),
    "image-to-image": (
        {"prompt": "autumn", "steps": "8", "strength": "0.5", "seed": "7"},
        {"image": png_bytes(320, 256)},
    ),
    "inpaint-image": (
        {"steps": "6", "seed": "99"},
        {"image": png_bytes(256, 320), "mask": mask_bytes(256, 320)},
    ),
}


def remake(doc: dict[str, Any], folder: Path, work: Path) -> bytes:
    """Image `doc` describes, made again by running its script (the simulator's) directly with
    the recorded flags, the job's input files and the checkpoint the digest names, as a user
    would by hand (README, "Seeds")."""
    checkpoint = DEMO_MODELS / doc["checkpoint"]["name"]
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == doc["checkpoint"]["sha256"]
    outdir = work / "out"
    paths = {"{outdir}": outdir, "{checkpoint}": checkpoint, "{inputs}": folder / "inputs"}
    flags = []
    for flag in doc["script"]["flags"]:
        for placeholder, path in paths.items():
            flag = flag.replace(placeholder, str(path))
        flags.append(flag)
    script = SIMULATOR / doc["script"]["path"]
    cwd = SIMULATOR
    if doc["endpoint"] == "inpaint-image":
        cwd = work / "cwd"  # inpaint.py opens its config and checkpoint by relative path
        models = cwd / "models" / "ldm" / "inpainting_big"
        models.mkdir(parents=True)
        (models / "config.yaml").symlink_to(SIMULATOR / "models/ldm/inpainting_big/config.yaml")
        (models / "last.ckpt").symlink_to(checkpoint)
    seed = doc["script"]["torchSeed"]
    start = (
        "import runpy, sys, torch\n"
        + (f"torch.manual_seed({seed})\n" if seed is not None else "")
        + f"sys.argv = [{str(script)!r}, *{flags!r}]\n"
        + f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SD_SIM_")}
    env.update(SD_SIM_LOAD_SECONDS="0", SD_SIM_STEP_SECONDS="0", PYTHONPATH=str(SIMULATOR))
    subprocess.run([sys.executable, "-c", start], cwd=cwd, env=env, check=True, capture_output=True)
    if doc["endpoint"] == "inpaint-image":
        return (outdir / "image.png").read_bytes()
    return (outdir / "samples" / f"{doc['image']['position'] - 1:05}.png").read_bytes()


@pytest.mark.parametrize("endpoint", list(REQUESTS))
def test_every_image_carries_its_parameters_and_is_made_again_from_them(
    shared_server, endpoint: str, tmp_path: Path
) -> None:
    fields, files = REQUESTS[endpoint]
    posted = shared_server.post_form(endpoint, fields, files)
    assert posted.status == 303, posted.body
    url = posted.headers["Location"]
    status = shared_server.wait_status(url, {"COMPLETE", "FAILED"})
    assert status["status"] == "COMPLETE", status
    item = next(
        i for i in shared_server.get("/jobs?limit=500").json()["items"] if i["resultUrl"] == url
    )
    params = item["params"]
    checkpoint = DEMO_MODELS / f"{ENDPOINTS[endpoint].model.value}.ckpt"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert [image["url"] for image in status["images"]] == status["imageUrls"]
    for number, image in enumerate(status["images"], 1):
        png = shared_server.get(image["url"]).body
        texts = text_chunks(png)
        assert set(texts) == OURS
        prompt, negative, settings_read = parse_infotext(texts["parameters"])
        assert (prompt, negative) == (params.get("prompt", ""), "")
        width, height = pixels(png)[1]
        expected = {
            "Steps": str(params["steps"]),
            "Sampler": "DDIM",
            "Seed": str(image["seed"]),
            "Size": f"{width}x{height}",
            "Model hash": digest[:10],
            "Model": checkpoint.stem,
        }
        if "guidanceScale" in params:
            expected["CFG scale"] = str(float(params["guidanceScale"]))
        if "strength" in params:
            expected["Denoising strength"] = str(float(params["strength"]))
        if params.get("eta"):
            expected["Eta DDIM"] = str(float(params["eta"]))
        if int(params.get("batchSize", 1)) > 1:
            expected["Batch size"] = str(params["batchSize"])
            expected["Batch pos"] = str((image["position"] - 1) % int(params["batchSize"]))
        if len(status["images"]) > 1:
            expected["Position in run"] = str(image["position"])
        assert settings_read == expected
        doc = json.loads(texts["sd-rest"])
        assert doc["request"] == params and doc["endpoint"] == endpoint
        assert doc["job"] == url.rsplit("/", 1)[1]
        assert doc["image"] == {"number": number, **{k: image[k] for k in ("seed", "position")}}
        assert doc["server"] == {"name": "sd-rest", "version": __version__}
        assert doc["checkpoint"]["sha256"] == digest
        assert doc["fork"] == {"commit": None}  # the simulator is no checkout of the fork
        assert str(shared_server.output) not in texts["sd-rest"]  # no server paths
        remade = remake(doc, job_folder(shared_server.output, url), tmp_path / f"remake-{number}")
        assert without_text(png, OURS) == remade  # only text chunks were added
        assert pixels(png) == pixels(remade)


def test_the_image_event_carries_the_seed_and_position(shared_server) -> None:
    from sse import EventStream

    fields = {"prompt": "events", "iterations": "2", "steps": "4", "width": "256", "height": "256"}
    url = shared_server.post_form("text-to-image", fields).headers["Location"]
    with EventStream(shared_server, f"{url}/events") as stream:
        images = [e.data for e in stream.rest() if e.event == "image"]
    if not images:  # it had finished before the stream opened: the final event alone
        images = [
            {"position": i["position"], "seed": i["seed"], "url": i["url"]}
            for i in shared_server.get(url).json()["images"]
        ]
    assert [(i["position"], i["seed"]) for i in images] == [(1, 42), (2, 42)]


# --- provenance: hashed once, in the background ---------------------------------------------


def test_a_checkpoint_is_hashed_once_and_the_digest_survives_a_restart(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights" * 1000)
    cache = tmp_path / "output" / ".checkpoints.json"
    cache.parent.mkdir()
    first = Provenance(cache, tmp_path)
    assert first.checkpoint_sha256(checkpoint) is None  # not known yet: hashing begins
    assert first.wait(10)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert first.checkpoint_sha256(checkpoint) == digest
    saved = json.loads(cache.read_text())["files"][str(checkpoint)]
    assert saved["sha256"] == digest and saved["size"] == checkpoint.stat().st_size
    again = Provenance(cache, tmp_path)  # a restart: read from the cache, no thread
    assert again.checkpoint_sha256(checkpoint) == digest and again._thread is None
    # Changed (size and time): not the same file any more, hashed anew.
    checkpoint.write_bytes(b"other weights")
    assert again.checkpoint_sha256(checkpoint) is None
    assert again.wait(10)
    assert again.checkpoint_sha256(checkpoint) == hashlib.sha256(b"other weights").hexdigest()
    # A damaged cache is ignored, with a warning, and made again.
    cache.write_text("{not json")
    assert Provenance(cache, tmp_path).checkpoint_sha256(checkpoint) is None
    assert Provenance(cache, tmp_path).checkpoint_sha256(tmp_path / "missing.ckpt") is None


def big_sparse_file(path: Path, size: int = 32 * 1024**3) -> Path:
    """Far more hashing than a job takes (1.3 GB/s at best here: 25 s), for no disk space;
    the tests stop it when they end (Provenance.close)."""
    with path.open("wb") as file:
        file.truncate(size)
    return path


def test_asking_never_waits_for_a_hash_and_closing_stops_it(tmp_path: Path) -> None:
    big = big_sparse_file(tmp_path / "big.ckpt")
    provenance = Provenance(tmp_path / ".checkpoints.json", tmp_path)
    provenance.start([big])
    started = time.perf_counter()
    for _ in range(100):
        assert provenance.checkpoint_sha256(big) is None
    assert time.perf_counter() - started < 0.5  # a stat each, never the hash
    assert provenance._thread is not None and provenance._thread.is_alive()
    provenance.close()
    assert provenance.wait(5)  # within one chunk
    assert not (tmp_path / ".checkpoints.json").exists()


def test_publication_does_not_wait_for_the_checkpoint_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first job on a checkpoint still being hashed: its images are published at once,
    without the digest (no `Model hash`, sha256 null), the job completes, and the digest
    is still being computed."""
    for name, value in FAST_SIMULATOR.items():
        monkeypatch.setenv(name, value)
    big = big_sparse_file(tmp_path / "big.ckpt")

    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "output", text_to_image_model=big))
        await manager.start(manager.recover())
        begun = time.monotonic()
        job = await manager.submit("text-to-image", text_params(iterations=2), {}, {})
        await until(lambda: job.status.finished, "the job to finish")
        took = time.monotonic() - begun
        hashing = manager.provenance._thread is not None and manager.provenance._thread.is_alive()
        await manager.shutdown()
        assert job.status is Status.COMPLETE and hashing, (job.status, took)
        assert took < 5.0
        for record in job.images:
            png = manager.store.layout.image(job.endpoint, job.id, record.n).read_bytes()
            texts = text_chunks(png)
            assert "Model hash" not in parse_infotext(texts["parameters"])[2]
            assert json.loads(texts["sd-rest"])["checkpoint"]["sha256"] is None

    asyncio.run(scenario())


def test_the_forks_commit_from_its_checkout_or_its_marker(tmp_path: Path) -> None:
    fork = tmp_path / "fork"
    (fork / "scripts").mkdir(parents=True)
    assert read_fork_commit(fork) is None
    git = ["git", "-C", str(fork), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (fork / "scripts" / "txt2img.py").write_text("pass\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert read_fork_commit(fork) == head
    # A folder inside another checkout is not a checkout of the fork (the simulator).
    assert read_fork_commit(fork / "scripts") is None
    assert read_fork_commit(SIMULATOR) is None
    marker = "0123456789abcdef0123456789abcdef01234567"
    (fork / "scripts" / ".source-commit").write_text(marker.upper() + "\n")
    assert read_fork_commit(fork / "scripts") == marker
    (fork / "scripts" / ".source-commit").write_text("not a commit\n")
    assert read_fork_commit(fork / "scripts") is None


# --- a metadata failure never loses or holds back an image -----------------------------------


class Sink:
    def __init__(self) -> None:
        self.records: list[ImageRecord] = []

    async def started(self, pid: int | None) -> None:
        return None

    def progress(self, index: int, fraction: float) -> None:
        return None

    async def published(self, record: ImageRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("label", ["fails", "works"])
def test_an_image_is_published_even_when_its_metadata_fails(
    tmp_path: Path, label: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The real publisher on a run folder the test fills as a script would; its labeller is
    the one stand-in here: the real one cannot be made to fail, and this is the guard for
    the day it does."""
    script_png = png_bytes(256, 256, (1, 2, 3))

    def failing(png: bytes, number: int, position: int) -> bytes:
        raise RuntimeError("the metadata could not be made")

    def working(png: bytes, number: int, position: int) -> bytes:
        from sd_rest.images.pngmeta import add_text_chunks

        return add_text_chunks(png, [("parameters", f"image {number} at {position}")])

    async def scenario() -> list[ImageRecord]:
        images = tmp_path / "run" / "out" / "samples"
        images.mkdir(parents=True)
        folders = RunFolders(tmp_path / "run", images.parent, images, tmp_path)
        params = text_params(iterations=2)
        sink = Sink()
        publisher = ImagePublisher(
            ENDPOINTS["text-to-image"],
            folders,
            plan_run(params, 2, 0),
            lambda n: tmp_path / f"{n}.png",
            sink,
            lambda exc, what: pytest.fail(f"{what}: {exc}"),
            failing if label == "fails" else working,
        )
        for k in range(2):
            (images / f"{k:05}.png").write_bytes(script_png)
        started = time.perf_counter()
        await publisher.publish_ready()
        assert time.perf_counter() - started < 1.0
        return sink.records

    with caplog.at_level(logging.ERROR):
        records = asyncio.run(scenario())
    assert [r.n for r in records] == [1, 2]
    for record in records:
        published = (tmp_path / f"{record.n}.png").read_bytes()
        assert hashlib.sha256(published).hexdigest() == record.sha256
        assert pixels(published) == pixels(script_png)
        if label == "fails":
            assert published == script_png  # as the script wrote it
        else:
            assert text_chunks(published) == {"parameters": f"image {record.n} at {record.n}"}
    logged = [r for r in caplog.records if "published without it" in r.getMessage()]
    assert len(logged) == (2 if label == "fails" else 0)
