"""Decode uploaded images and turn them into the PNG files the scripts read.

Pure: bytes in, bytes out. Uploads are hostile until decoded: the format is decided by
decoding, never by the client's content type; sizes are checked from the header before
any pixel is allocated; and every failure of the decoder is a 400 or 415, never a 500.

Decisions the scripts leave open:
- Transparency is composited on white for images (what a viewer shows on a white page)
  and on black for masks (only visible white asks for repainting).
- Masks are binarised at 128, the threshold inpaint.py applies itself (value / 255 ≥ 0.5),
  so the stored mask is exactly the one the model uses.
- Colour profiles and other metadata are dropped: the scripts ignore them, and an EXIF
  orientation left in the output would rotate the already rotated pixels a second time.
"""

from __future__ import annotations

import io
from typing import Final

from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from sd_rest.errors import ApiError, invalid
from sd_rest.fields import MAX_PIXELS, MAX_SIDE, MIN_PIXELS

MAX_UPLOAD_BYTES: Final = 20 * 1024 * 1024  # the app's request size limit uses this
MAX_DECODE_PIXELS: Final = 40_000_000  # refuse before decoding anything bigger
MAX_DECODE_SIDE: Final = 16384  # WebP's own limit; longer sides are no photograph
# img2img.py only cuts its init image to multiples of 32 itself, but the model's UNet needs
# multiples of 64 (as for txt2img's sizes): we cut to 64 so the script's own cut is a no-op.
IMAGE_TO_IMAGE_MULTIPLE: Final = 64
# The inpainting model's first stage divides sides by 4 and its UNet halves them three times.
INPAINT_MULTIPLE: Final = 32
MASK_THRESHOLD: Final = 128
MASK_RATIO_TOLERANCE: Final = 0.01

_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
_FORMAT_NAMES: Final = "a PNG, JPEG or WebP image"
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES: Final = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def decode_image(field: str, data: bytes) -> Image.Image:
    """The fully loaded image, turned as its EXIF orientation says, in its decoded mode."""
    return _load(field, _open(field, data))


def prepare_init_image(data: bytes) -> bytes:
    """image-to-image: PNG bytes of the RGB image cut down (top-left kept) to multiples of 64."""
    opened = _open("image", data)
    _cut_size("image", opened.size, IMAGE_TO_IMAGE_MULTIPLE)  # refuse before decoding the pixels
    picture = to_rgb(_load("image", opened))
    width, height = _cut_size("image", picture.size, IMAGE_TO_IMAGE_MULTIPLE)  # turned by EXIF
    return png(_crop(picture, width, height))


def prepare_inpaint(image: bytes, mask: bytes) -> tuple[bytes, bytes]:
    """inpaint-image: (image PNG, mask PNG) of one size, cut down to multiples of 32.

    The cut keeps the top-left corner. A mask of the image's aspect ratio but another size
    is resized to the image first.
    """
    opened = _open("image", image)
    _cut_size("image", opened.size, INPAINT_MULTIPLE)  # refuse before decoding the pixels
    picture = to_rgb(_load("image", opened))
    width, height = _cut_size("image", picture.size, INPAINT_MULTIPLE)  # turned by EXIF
    drawn = _load("mask", _open("mask", mask))
    if not _same_ratio(picture.size, drawn.size):
        raise invalid(
            "mask",
            f"mask is {_dims(drawn.size)} but image is {_dims(picture.size)}: the mask must have "
            f"the image's aspect ratio (within {MASK_RATIO_TOLERANCE:.0%})",
        )
    gray = to_gray(drawn)
    if gray.size != picture.size:
        gray = gray.resize(picture.size, Image.Resampling.BILINEAR)
    binary = gray.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
    return png(_crop(picture, width, height)), png(_crop(binary, width, height))


def _open(field: str, data: bytes) -> ImageFile.ImageFile:
    """Identify the format and read the header only; refuse what must not be decoded.

    The plugins are used directly rather than through Image.open so that the outcome does
    not depend on the process-wide Image.MAX_IMAGE_PIXELS: our own limits apply instead.
    """
    factory: type[ImageFile.ImageFile]
    if data.startswith(_PNG_MAGIC):
        factory, name = PngImagePlugin.PngImageFile, "PNG"
    elif data.startswith(_JPEG_MAGIC):
        factory, name = JpegImagePlugin.JpegImageFile, "JPEG"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        factory, name = WebPImagePlugin.WebPImageFile, "WebP"
        # Pillow's WebP decoder allocates its canvas while opening: check the size first.
        size = _webp_size(data)
        if size is not None:
            _check_decode_size(field, size)
    else:
        raise ApiError(415, "unsupported_media_type", f"{field} must be {_FORMAT_NAMES}", field)
    try:
        opened = factory(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_large(field, None) from None
    except Exception:  # any failure on hostile bytes is the client's file, not our bug
        raise _corrupt(field, name) from None
    width, height = opened.size
    if width < 1 or height < 1:
        raise _corrupt(field, name)
    _check_decode_size(field, opened.size)
    return opened


def _load(field: str, opened: ImageFile.ImageFile) -> Image.Image:
    name = {"WEBP": "WebP"}.get(str(opened.format), str(opened.format))
    try:
        opened.load()
    except Image.DecompressionBombError:
        raise _too_large(field, opened.size) from None
    except Exception:
        raise _corrupt(field, name) from None
    try:
        return ImageOps.exif_transpose(opened)
    except Exception:
        # An unreadable EXIF block: viewers ignore it too and show the pixels as stored.
        return opened


def _check_decode_size(field: str, size: tuple[int, int]) -> None:
    width, height = size
    if width > MAX_DECODE_SIDE or height > MAX_DECODE_SIDE or width * height > MAX_DECODE_PIXELS:
        raise _too_large(field, size)


def _too_large(field: str, size: tuple[int, int] | None) -> ApiError:
    stated = f" ({_dims(size)})" if size is not None else ""
    return ApiError(
        400,
        "image_too_large",
        f"{field} is too large to decode{stated}: at most {MAX_DECODE_PIXELS} pixels and "
        f"{MAX_DECODE_SIDE} pixels a side",
        field,
    )


def _corrupt(field: str, name: str) -> ApiError:
    return ApiError(
        400, "invalid_file", f"{field} is not a valid {name} file (truncated or corrupt)", field
    )


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from the first chunk of a WebP file, or None if it cannot be read."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        return width, height
    return None


def _cut_size(field: str, size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The size once cut down to `multiple`, if it is within the limits of generation.

    Can be checked on the header's size before decoding: turning by EXIF orientation swaps
    the sides, which changes neither the area nor the longest side.
    """
    width, height = size
    cut_width, cut_height = width - width % multiple, height - height % multiple
    cut = f"{_dims(size)}, cut down to multiples of {multiple}: {_dims((cut_width, cut_height))}"
    if max(cut_width, cut_height) > MAX_SIDE:
        raise invalid(field, f"{field} is {cut}; each side must be at most {MAX_SIDE} pixels")
    if cut_width * cut_height < MIN_PIXELS:
        raise invalid(
            field,
            f"{field} is {cut} = {cut_width * cut_height} pixels; it must be at least "
            f"{MIN_PIXELS} pixels (256×256)",
        )
    if cut_width * cut_height > MAX_PIXELS:
        raise invalid(
            field,
            f"{field} is {cut} = {cut_width * cut_height} pixels, too large for this server: "
            f"at most {MAX_PIXELS} pixels (1024×1024); scale it down",
        )
    return cut_width, cut_height


def _same_ratio(image: tuple[int, int], mask: tuple[int, int]) -> bool:
    image_ratio = image[0] / image[1]
    mask_ratio = mask[0] / mask[1]
    return abs(mask_ratio - image_ratio) <= MASK_RATIO_TOLERANCE * image_ratio


def _eight_bit(image: Image.Image) -> Image.Image:
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    # Pillow clips 16-bit values when converting to L; scale them down instead. A 16-bit
    # transparent colour would not survive the scaling, so it is dropped.
    scaled = image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    scaled.info.pop("transparency", None)
    return scaled


# What the image-to-image and inpaint inputs are made of, here and from AUTOMATIC1111's base64
# images (api/a1111/images.py): the same file gives the same pixels through either API.


def flatten(image: Image.Image, background: int) -> Image.Image:
    """RGBA without transparency: composited on a grey level of `background`."""
    canvas = Image.new("RGBA", image.size, (background, background, background, 255))
    canvas.alpha_composite(image.convert("RGBA"))
    return canvas


def has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit levels scaled down, transparency on white."""
    image = _eight_bit(image)
    if has_alpha(image):
        image = flatten(image, 255)
    return image.convert("RGB")


def to_gray(image: Image.Image) -> Image.Image:
    """8-bit grey: 16-bit levels scaled down, transparency on black (a mask's "keep")."""
    image = _eight_bit(image)
    if has_alpha(image):
        image = flatten(image, 0)
    return image.convert("L")


def _crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Keep the top-left `width`×`height`.

    Pasted rather than Image.crop, which applies the process-wide decompression bomb limit.
    """
    if image.size == (width, height):
        return image
    cropped = Image.new(image.mode, (width, height))
    cropped.paste(image, (0, 0))
    return cropped


def png(image: Image.Image) -> bytes:
    """PNG bytes of `image`, without its metadata (colour profile, text, EXIF)."""
    image.info.clear()  # every image reaching here is our own copy; see the module docstring
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _dims(size: tuple[int, int]) -> str:
    return f"{size[0]}×{size[1]}"
