"""The server on the real fork's unmodified scripts (tiny models, CPU): what the simulator can
only imitate. Needs the kit (tests/realfork.py); each script run costs ~5 s of loading."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from byhand import check_made_again_by_hand, png
from helpers import Server
from realfork import RealFork

pytestmark = pytest.mark.real_fork


@pytest.fixture(scope="module")
def fork_server(
    real_fork: RealFork, tmp_path_factory: pytest.TempPathFactory, certs: tuple[str, str, str]
):
    output = tmp_path_factory.mktemp("real-fork") / "output"
    server = Server(output=output, certs=certs, args=real_fork.server_args(), demo=False)
    server.start()
    yield server
    server.end()


def finished_images(server: Server, location: str) -> list[Image.Image]:
    doc = server.wait_status(location, {"COMPLETE", "FAILED"}, timeout=240)
    assert doc["status"] == "COMPLETE", f"{doc}\n{server.log()[-3000:]}"
    images = []
    for url in doc["imageUrls"]:
        with Image.open(io.BytesIO(server.get(url).body)) as image:
            image.load()
            images.append(image)
    return images


def test_text_to_image(fork_server: Server) -> None:
    resp = fork_server.post_form(
        "text-to-image",
        {"prompt": "a red lighthouse", "steps": "2", "width": "256", "height": "256",
         "batchSize": "2"},
    )  # fmt: skip
    assert resp.status == 303, resp.body
    images = finished_images(fork_server, resp.headers["Location"])
    assert [image.size for image in images] == [(256, 256)] * 2
    assert images[0].tobytes() != images[1].tobytes()


def test_image_to_image(fork_server: Server, real_fork: RealFork) -> None:
    init = png(real_fork.test_inputs / "init.png", (300, 290))  # cut to 256×256
    resp = fork_server.post_form(
        "image-to-image", {"prompt": "autumn", "steps": "4", "strength": "0.5"}, {"image": init}
    )
    assert resp.status == 303, resp.body
    (image,) = finished_images(fork_server, resp.headers["Location"])
    assert image.size == (256, 256)


@pytest.mark.parametrize(
    ("size", "made"),
    [((264, 264), (256, 256)), ((272, 256), (256, 256)), ((333, 517), (320, 512))],
)
def test_inpaint_sizes_the_model_cannot_take_are_cut_so_it_can(
    fork_server: Server, real_fork: RealFork, size: tuple[int, int], made: tuple[int, int]
) -> None:
    # Uncut, inpaint.py fails on each of these with "Sizes of tensors must match …".
    inputs = real_fork.test_inputs / "inpaint"
    files = {"image": png(inputs / "a.png", size), "mask": png(inputs / "a_mask.png", size)}
    resp = fork_server.post_form("inpaint-image", {"steps": "2"}, files)
    assert resp.status == 303, resp.body
    (image,) = finished_images(fork_server, resp.headers["Location"])
    assert image.size == made


@pytest.mark.parametrize("endpoint", ["text-to-image", "inpaint-image"])
def test_the_metadata_makes_the_image_again_with_the_real_script(
    fork_server: Server, real_fork: RealFork, endpoint: str, tmp_path: Path
) -> None:
    """The `sd-rest` chunk of a published image, followed by hand as the README says (the
    script it names, its flags, the checkpoint its digest names, inpaint seeded through torch):
    the same PNG, byte for byte, but for the two text chunks the server added."""
    check_made_again_by_hand(fork_server, real_fork, endpoint, tmp_path)
