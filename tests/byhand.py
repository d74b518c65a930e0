"""A job's image made again by hand on the real fork, from the label the server put in it:
the README's promise that the metadata is enough to reproduce an image, checked for a server
and for a worker host behind an API node alike."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image

from helpers import Server, job_folder
from pngparts import text_chunks, without_text
from realfork import RealFork
from workerharness import inpaint_cwd, run_by_hand


def png(path: Path, size: tuple[int, int] | None = None) -> bytes:
    with Image.open(path) as image:
        picture = image.convert("RGB")
    if size is not None:
        picture = picture.resize(size)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def check_made_again_by_hand(
    server: Server, real_fork: RealFork, endpoint: str, tmp_path: Path
) -> None:
    """A job of `endpoint` on `server`, its last image made again by hand from its label (the
    cluster's test runs it through a remote worker host)."""
    if endpoint == "text-to-image":
        fields = {"prompt": "a fox, at dusk", "steps": "2", "width": "256", "height": "256",
                  "iterations": "2", "seed": "11"}  # fmt: skip
        files: dict[str, bytes] = {}
        checkpoint = real_fork.text_to_image_model
    else:
        inputs = real_fork.test_inputs / "inpaint"
        fields = {"steps": "2", "seed": "5"}
        files = {"image": png(inputs / "a.png"), "mask": png(inputs / "a_mask.png")}
        checkpoint = real_fork.inpaint_image_model
    resp = server.post_form(endpoint, fields, files)
    assert resp.status == 303, resp.body
    url = resp.headers["Location"]
    doc = server.wait_status(url, {"COMPLETE", "FAILED"}, timeout=240)
    assert doc["status"] == "COMPLETE", doc
    published = server.get(doc["images"][-1]["url"]).body
    label = json.loads(text_chunks(published)["sd-rest"])
    assert label["checkpoint"] == {
        "name": checkpoint.name,
        "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
    }
    commit = (real_fork.repository / ".source-commit").read_text().strip()
    assert label["fork"] == {"commit": commit}

    outdir = tmp_path / "out"
    places = {"{outdir}": str(outdir), "{checkpoint}": str(checkpoint),
              "{inputs}": str(job_folder(server.output, url) / "inputs")}  # fmt: skip
    flags = []
    for flag in label["script"]["flags"]:
        for placeholder, path in places.items():
            flag = flag.replace(placeholder, path)
        flags.append(flag)
    cwd = real_fork.repository
    if endpoint == "inpaint-image":
        cwd = inpaint_cwd(tmp_path / "cwd", real_fork.repository, checkpoint)
    result = run_by_hand(
        real_fork.python, real_fork.repository, real_fork.repository / label["script"]["path"],
        flags, cwd, label["script"]["torchSeed"], tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    made = sorted(outdir.rglob("*.png"))
    if endpoint == "text-to-image":
        made = sorted((outdir / "samples").glob("*.png"))
    by_hand = made[label["image"]["position"] - 1].read_bytes()
    assert without_text(published, {"parameters", "sd-rest"}) == by_hand
