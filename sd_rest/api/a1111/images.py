"""AUTOMATIC1111's images in, ours out. Pure (bytes in, bytes out), and slow enough on a big
image to belong in a thread (routes.py).

An image comes as base64, raw or as a `data:image/...;base64,` URL. It is decoded by our
uploads' decoder (the same limits and refusals), then resized to the request's width × height
as AUTOMATIC1111's default resize mode ("Just resize": stretched, Lanczos) does."""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from sd_rest.api.a1111.errors import DialectError, invalid
from sd_rest.errors import ApiError
from sd_rest.images.uploads import MAX_UPLOAD_BYTES, decode_image, png, to_gray, to_rgb

Loc = list[str | int]


def decode_base64(loc: Loc, text: str) -> bytes:
    """The bytes of a base64 image, with or without its `data:` prefix; 422 otherwise."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or ";base64" not in header:
            raise invalid(loc, "a data: URL must be base64 (data:image/png;base64,...)")
    if len(text) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise invalid(loc, f"the image is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise invalid(loc, "the image is not valid base64") from None
    if not data:
        raise invalid(loc, "the image is empty")
    return data


def resized_image(loc: Loc, data: bytes, size: tuple[int, int]) -> bytes:
    """An RGB PNG of `size`, made as our uploads make one (to_rgb: 16-bit levels scaled,
    transparency on white, no metadata), then stretched."""
    return png(to_rgb(_decoded(loc, data)).resize(size, Image.Resampling.LANCZOS))


def resized_mask(loc: Loc, data: bytes, size: tuple[int, int], invert: bool) -> bytes:
    """A grayscale PNG of `size`, made as our uploads make a mask (to_gray: transparency counts
    as black, keep), white where the image is repainted (inverted when asked: AUTOMATIC1111's
    inpainting_mask_invert)."""
    gray = to_gray(_decoded(loc, data)).resize(size, Image.Resampling.LANCZOS)
    if invert:
        gray = gray.point(lambda value: 255 - value)
    return png(gray)


def _decoded(loc: Loc, data: bytes) -> Image.Image:
    try:
        return decode_image(str(loc[-1]), data)
    except ApiError as error:
        raise _as_422(loc, error) from None


def _as_422(loc: Loc, error: ApiError) -> DialectError:
    return invalid(loc, error.message)

