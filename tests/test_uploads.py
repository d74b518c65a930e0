"""Upload decoding with real images made by Pillow in memory, and hostile bytes."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable

import pytest
from PIL import Image

from sd_rest.errors import ApiError
from sd_rest.images.uploads import (
    MAX_DECODE_PIXELS,
    decode_image,
    prepare_init_image,
    prepare_inpaint,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def marked(size: tuple[int, int], marker: tuple[int, int, int] = RED) -> Image.Image:
    """Blue with a marker block in the top-left corner, to see where the corner went."""
    image = Image.new("RGB", size, BLUE)
    image.paste(marker, (0, 0, 64, 64))
    return image


def refused(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size, with a few KB expanding to 100 MB of pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 100_000_000, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (64, 64)), "JPEG"))
    frame = data.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, height, width
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (64, 64)), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
    bits |= (width - 1) | ((height - 1) << 14)
    data[21:25] = bits.to_bytes(4, "little")
    return bytes(data)


@pytest.fixture
def no_pillow_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch Pillow's own protection off: only ours can refuse."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)


# --- accepted formats -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("PNG", {}), ("JPEG", {"quality": 95}), ("WEBP", {}), ("WEBP", {"lossless": True})],
)
def test_accepted_formats_become_an_rgb_png_cut_to_multiples_of_64(
    fmt: str, options: dict[str, object]
) -> None:
    output = decoded(prepare_init_image(encode(marked((333, 300)), fmt, **options)))
    assert (output.size, output.mode) == ((320, 256), "RGB")
    red, green, blue = output.getpixel((10, 10))
    assert red > 200 and green < 60 and blue < 60
    assert output.getpixel((300, 200))[2] > 200


@pytest.mark.parametrize("mode", ["L", "P", "1", "CMYK", "LA", "RGBA"])
def test_other_modes_are_converted_to_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    output = decoded(prepare_init_image(encode(marked((256, 256)).convert(mode), fmt)))
    assert (output.size, output.mode) == ((256, 256), "RGB")


def test_decode_image_returns_the_loaded_image_in_its_mode() -> None:
    image = decode_image("image", encode(Image.new("LA", (70, 50)), "PNG"))
    assert (image.size, image.mode) == ((70, 50), "LA")


# --- refused types and broken files ---------------------------------------------------------

UNSUPPORTED = {
    "gif": encode(marked((256, 256)), "GIF"),
    "bmp": encode(marked((256, 256)), "BMP"),
    "tiff": encode(marked((256, 256)), "TIFF"),
    "ico": encode(marked((64, 64)), "ICO"),
    "text": b"a painting of a cat\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512"/>',
    "empty": b"",
    "random": random.Random(0).randbytes(4096),
    "riff-not-webp": b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(20),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_other_types_are_415(kind: str) -> None:
    error = refused(lambda: prepare_init_image(UNSUPPORTED[kind]))
    assert (error.status, error.code, error.field) == (415, "unsupported_media_type", "image")
    assert error.message == "image must be a PNG, JPEG or WebP image"


def test_the_field_is_named_in_the_415() -> None:
    image = encode(marked((256, 256)), "PNG")
    error = refused(lambda: prepare_inpaint(image, UNSUPPORTED["gif"]))
    assert (error.status, error.field) == (415, "mask")
    assert error.message.startswith("mask must be")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_files_are_400(fmt: str, keep: float) -> None:
    noise = Image.frombytes("RGB", (256, 256), random.Random(1).randbytes(256 * 256 * 3))
    data = encode(noise, fmt)
    error = refused(lambda: prepare_init_image(data[: int(len(data) * keep)]))
    assert (error.status, error.code, error.field) == (400, "invalid_file", "image")


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP"])
def test_a_bare_signature_is_400(data: bytes) -> None:
    error = refused(lambda: decode_image("mask", data))
    assert (error.status, error.code, error.field) == (400, "invalid_file", "mask")


def test_a_png_with_a_zero_size_is_400() -> None:
    data = png_claiming(0, 10)
    error = refused(lambda: decode_image("image", data))
    assert (error.status, error.code) == (400, "invalid_file")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_hostile_mutations_never_escape_as_anything_but_api_errors(fmt: str) -> None:
    original = encode(marked((64, 48)), fmt)
    rng = random.Random(fmt)
    outcomes: set[int] = set()
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)) :]
        try:
            image = decode_image("image", bytes(data))
        except ApiError as error:
            assert error.status in (400, 415)
            assert error.field == "image"
            outcomes.add(error.status)
        else:
            assert image.size[0] * image.size[1] <= MAX_DECODE_PIXELS
            outcomes.add(200)
    assert 400 in outcomes


# --- decompression bombs --------------------------------------------------------------------


@pytest.mark.usefixtures("no_pillow_bomb_limit")
@pytest.mark.parametrize(
    ("make", "size"),
    [
        (png_claiming, (100_000, 100_000)),
        (png_claiming, (7_000, 7_000)),  # above our limit, below Pillow's default one
        (png_claiming, (20_000, 10)),  # few pixels, absurd side
        (jpeg_claiming, (60_000, 60_000)),
        (webp_claiming, (16_384, 16_384)),
    ],
)
def test_bombs_are_refused_from_the_header(
    make: Callable[[int, int], bytes], size: tuple[int, int]
) -> None:
    data = make(*size)
    for call in (
        lambda: decode_image("image", data),
        lambda: prepare_init_image(data),
        lambda: prepare_inpaint(encode(marked((256, 256)), "PNG"), data),
    ):
        error = refused(call)
        assert (error.status, error.code) == (400, "image_too_large")
        assert f"{size[0]}×{size[1]}" in error.message


def test_the_bomb_check_does_not_need_pillows_warning_filter() -> None:
    data = png_claiming(10_000, 9_000)  # 90 M pixels: Pillow alone would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = refused(lambda: decode_image("image", data))
    assert error.code == "image_too_large"


def test_a_lowered_pillow_limit_does_not_refuse_png_or_jpeg(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uploads = {fmt: encode(marked((300, 260)), fmt) for fmt in ("PNG", "JPEG")}
    masks = {fmt: encode(Image.new("L", (300, 260)), fmt) for fmt in uploads}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs = {
            fmt: (prepare_init_image(data), *prepare_inpaint(data, masks[fmt]))
            for fmt, data in uploads.items()
        }
    monkeypatch.undo()  # our own checks below open the outputs with Image.open
    for init, image, mask in outputs.values():
        assert decoded(init).size == (256, 256)
        assert decoded(image).size == decoded(mask).size == (288, 256)


def test_a_lowered_pillow_limit_on_webp_is_never_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pillow 13's WebP decoder applies the global limit itself while opening (12 does not):
    # either way the upload is decoded or refused as too large, never an unexpected error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(marked((300, 260)), "WEBP")
    try:
        output = prepare_init_image(data)
    except ApiError as error:
        assert (error.status, error.code) == (400, "image_too_large")
    else:
        monkeypatch.undo()  # so that the test itself can decode the result
        assert decoded(output).size == (256, 256)


# --- orientation, transparency, depth -------------------------------------------------------


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied_and_not_kept(fmt: str) -> None:
    # 6: the stored pixels must be turned 90° clockwise to be seen as the user sees them,
    # which moves the stored top-left corner to the top-right.
    data = with_orientation(marked((320, 256)), fmt, 6)
    output = decoded(prepare_init_image(data))
    assert output.size == (256, 320)
    assert output.getpixel((250, 5))[0] > 200
    assert output.getpixel((5, 5))[2] > 200
    assert "exif" not in output.info
    assert output.getexif().get(ORIENTATION) is None


def test_exif_orientation_8_moves_the_corner_to_the_bottom_left() -> None:
    output = decode_image("image", with_orientation(marked((320, 256)), "PNG", 8))
    assert output.size == (256, 320)
    assert output.getpixel((5, 315)) == RED


def test_transparency_is_composited_on_white_for_images() -> None:
    image = Image.new("RGBA", (256, 256), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 128, 256))
    output = decoded(prepare_init_image(encode(image, "PNG")))
    assert output.getpixel((10, 10)) == BLUE
    assert output.getpixel((200, 10)) == (255, 255, 255)


def test_palette_transparency_is_composited_too() -> None:
    image = Image.new("P", (256, 256), 0)
    image.putpalette([*RED, *BLUE])
    output = decoded(prepare_init_image(encode(image, "PNG", transparency=0)))
    assert output.getpixel((10, 10)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (256, 256), 128 * 257)
    output = decoded(prepare_init_image(encode(image, "PNG")))
    assert output.getpixel((0, 0)) == (128, 128, 128)


def test_icc_profiles_are_dropped() -> None:
    data = encode(marked((256, 256)), "PNG", icc_profile=b"not really a profile")
    assert "icc_profile" not in decoded(prepare_init_image(data)).info


# --- image-to-image size limits -------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "cut"),
    [
        ((319, 300), (256, 256)),
        ((1055, 1055), (1024, 1024)),
        ((2048, 512), (2048, 512)),
        ((512, 2079), (512, 2048)),
        ((300, 1000), (256, 960)),
    ],
)
def test_init_images_within_the_limits_are_cut_to_multiples_of_64(
    size: tuple[int, int], cut: tuple[int, int]
) -> None:
    assert decoded(prepare_init_image(encode(Image.new("RGB", size), "PNG"))).size == cut


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((300, 200), "256×192 = 49152 pixels"),
        ((255, 4000), "192×3968"),
        ((1100, 1100), "1088×1088 = 1183744 pixels, too large"),
        ((2200, 256), "each side must be at most 2048"),
    ],
)
def test_init_images_outside_the_limits_are_refused(size: tuple[int, int], message: str) -> None:
    data = encode(Image.new("L", size), "PNG")
    error = refused(lambda: prepare_init_image(data))
    assert (error.status, error.code, error.field) == (400, "invalid_field", "image")
    assert f"{size[0]}×{size[1]}" in error.message
    assert message in error.message


# --- inpaint ----------------------------------------------------------------------------------


def gradient(size: tuple[int, int]) -> Image.Image:
    width, height = size
    data = bytes(v for y in range(height) for x in range(width) for v in (x % 256, y % 256, 99))
    return Image.frombytes("RGB", size, data)


def test_inpaint_cuts_both_to_multiples_of_32_keeping_the_top_left() -> None:
    picture = gradient((300, 270))
    mask = Image.new("L", (300, 270), 0)
    mask.paste(255, (280, 250, 300, 270))  # the bottom-right strip that the cut removes
    mask.paste(255, (0, 0, 10, 10))
    image_png, mask_png = prepare_inpaint(encode(picture, "PNG"), encode(mask, "PNG"))
    image_out, mask_out = decoded(image_png), decoded(mask_png)
    assert (image_out.size, image_out.mode) == ((288, 256), "RGB")
    assert (mask_out.size, mask_out.mode) == ((288, 256), "L")
    assert image_out.tobytes() == picture.crop((0, 0, 288, 256)).tobytes()
    assert mask_out.getpixel((0, 0)) == 255
    assert mask_out.getpixel((287, 255)) == 255  # the strip's part that stays
    assert mask_out.getpixel((279, 249)) == 0


@pytest.mark.parametrize(
    ("size", "cut"),
    [((264, 264), (256, 256)), ((272, 256), (256, 256)), ((333, 517), (320, 512))],
)
def test_inpaint_sizes_the_model_cannot_take_are_cut(
    size: tuple[int, int], cut: tuple[int, int]
) -> None:
    image_png, mask_png = prepare_inpaint(
        encode(gradient(size), "PNG"), encode(Image.new("L", size), "PNG")
    )
    assert decoded(image_png).size == decoded(mask_png).size == cut


def test_inpaint_masks_are_binarised_at_the_scripts_threshold() -> None:
    mask = Image.new("L", (256, 256), 127)
    mask.paste(128, (0, 0, 128, 256))
    _, mask_png = prepare_inpaint(encode(gradient((256, 256)), "PNG"), encode(mask, "PNG"))
    output = decoded(mask_png)
    assert output.getpixel((10, 10)) == 255
    assert output.getpixel((200, 10)) == 0
    assert output.getextrema() == (0, 255)
    assert output.histogram()[1:255] == [0] * 254


def test_an_rgb_or_transparent_mask_becomes_grayscale_with_transparent_as_keep() -> None:
    mask = Image.new("RGBA", (256, 256), (255, 255, 255, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 128, 256))
    _, mask_png = prepare_inpaint(encode(gradient((256, 256)), "PNG"), encode(mask, "PNG"))
    output = decoded(mask_png)
    assert output.mode == "L"
    assert (output.getpixel((10, 10)), output.getpixel((200, 10))) == (255, 0)


def test_a_mask_of_another_size_with_the_same_ratio_is_resized() -> None:
    mask = Image.new("L", (200, 150), 0)
    mask.paste(255, (0, 0, 100, 150))  # the left half
    image_png, mask_png = prepare_inpaint(encode(gradient((403, 302)), "PNG"), encode(mask, "JPEG"))
    output = decoded(mask_png)
    assert decoded(image_png).size == output.size == (384, 288)
    assert output.getpixel((5, 150)) == 255
    assert output.getpixel((195, 150)) == 255
    assert output.getpixel((206, 150)) == 0
    assert output.getpixel((383, 150)) == 0


@pytest.mark.parametrize("mask_size", [(401, 300), (397, 300), (4000, 3000), (4, 3)])
def test_a_mask_within_one_percent_of_the_ratio_is_accepted(mask_size: tuple[int, int]) -> None:
    image_png, mask_png = prepare_inpaint(
        encode(gradient((400, 300)), "PNG"), encode(Image.new("L", mask_size, 255), "PNG")
    )
    assert decoded(image_png).size == decoded(mask_png).size == (384, 288)
    assert decoded(mask_png).getextrema() == (255, 255)


@pytest.mark.parametrize("mask_size", [(410, 300), (200, 100), (300, 400)])
def test_a_mask_of_another_ratio_is_refused(mask_size: tuple[int, int]) -> None:
    image = encode(gradient((400, 300)), "PNG")
    mask = encode(Image.new("L", mask_size), "PNG")
    error = refused(lambda: prepare_inpaint(image, mask))
    assert (error.status, error.code, error.field) == (400, "invalid_field", "mask")
    assert f"{mask_size[0]}×{mask_size[1]}" in error.message
    assert "400×300" in error.message


def test_the_mask_ratio_is_compared_as_the_user_sees_both() -> None:
    # A portrait photo stored landscape with an EXIF turn, and a mask drawn over the portrait.
    image = with_orientation(gradient((400, 300)), "JPEG", 6)
    mask = encode(Image.new("L", (300, 400), 255), "PNG")
    image_png, mask_png = prepare_inpaint(image, mask)
    assert decoded(image_png).size == decoded(mask_png).size == (288, 384)


@pytest.mark.parametrize(
    ("size", "message"),
    [((250, 260), "224×256 = 57344"), ((1030, 1030), "1024×1024"), ((1056, 1024), "too large")],
)
def test_inpaint_area_limits_apply_to_the_cut_size(size: tuple[int, int], message: str) -> None:
    image = encode(gradient(size), "PNG")
    mask = encode(Image.new("L", size), "PNG")
    if size == (1030, 1030):
        assert decoded(prepare_inpaint(image, mask)[0]).size == (1024, 1024)
        return
    error = refused(lambda: prepare_inpaint(image, mask))
    assert (error.status, error.field) == (400, "image")
    assert message in error.message


def test_inpaint_reports_the_image_before_the_mask() -> None:
    error = refused(lambda: prepare_inpaint(b"nope", b"nope"))
    assert error.field == "image"
