"""Deterministic placeholder pictures: a layered mountain landscape under a sky.

Everything (time of day, hues, sun or moon, ridges, clouds, lake) comes from a hash of
(prompt, seed, image index), so a run is reproducible and different requests look
different. Pillow only, and cheap: smooth parts are painted small and scaled up.
"""

from __future__ import annotations

import colorsys
import hashlib
import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

SUPERSAMPLE = 2  # silhouettes are drawn this much larger, then reduced for smooth edges
SKY_SCALE = 8  # the sky is painted this much smaller, then scaled up


def scene_rng(prompt: str, seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def hsl(hue: float, saturation: float, lightness: float) -> RGB:
    r, g, b = colorsys.hls_to_rgb(hue % 1.0, lightness, saturation)
    return round(r * 255), round(g * 255), round(b * 255)


def mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


HSL = tuple[float, float, float]


@dataclass(frozen=True)
class Mood:
    """A time of day. Hue-based colours get turned by a random shift; light colours don't."""

    sky: tuple[HSL, HSL, HSL]  # top, middle, horizon
    sun: RGB
    glow: RGB
    glow_strength: float
    cloud: HSL
    far_tint: HSL  # mixed into the horizon colour to get the farthest range's colour
    far_mix: float
    near: HSL  # the nearest range
    night: bool = False


MOODS: dict[str, Mood] = {
    "day": Mood(
        ((0.58, 0.65, 0.42), (0.56, 0.6, 0.66), (0.54, 0.55, 0.86)),
        (255, 252, 235), (255, 250, 225), 0.55,
        (0.0, 0.0, 1.0), (0.55, 0.35, 0.55), 0.55, (0.42, 0.45, 0.16),
    ),
    "dawn": Mood(
        ((0.62, 0.45, 0.5), (0.93, 0.5, 0.76), (0.1, 0.85, 0.82)),
        (255, 246, 220), (255, 225, 190), 0.65,
        (0.97, 0.7, 0.88), (0.75, 0.3, 0.6), 0.5, (0.72, 0.3, 0.18),
    ),
    "sunset": Mood(
        ((0.7, 0.5, 0.28), (0.96, 0.6, 0.56), (0.08, 0.95, 0.64)),
        (255, 236, 170), (255, 190, 110), 0.8,
        (0.02, 0.8, 0.7), (0.85, 0.35, 0.4), 0.6, (0.78, 0.4, 0.09),
    ),
    "dusk": Mood(
        ((0.68, 0.55, 0.14), (0.76, 0.4, 0.33), (0.02, 0.65, 0.58)),
        (255, 214, 170), (255, 150, 120), 0.5,
        (0.9, 0.4, 0.5), (0.72, 0.3, 0.3), 0.65, (0.7, 0.35, 0.06),
    ),
    "night": Mood(
        ((0.64, 0.6, 0.05), (0.63, 0.5, 0.13), (0.6, 0.4, 0.27)),
        (238, 238, 222), (190, 205, 235), 0.35,
        (0.62, 0.25, 0.32), (0.62, 0.3, 0.2), 0.4, (0.64, 0.4, 0.035),
        night=True,
    ),
}  # fmt: skip
# Repeats weight the draw: the sky at day, sunset and night is the prettiest.
MOOD_DRAW = ("dawn", "day", "day", "sunset", "sunset", "dusk", "night", "night")


@dataclass(frozen=True)
class Palette:
    sky_top: RGB
    sky_mid: RGB
    horizon: RGB
    sun: RGB
    glow: RGB
    glow_strength: float
    cloud: RGB
    land_far: RGB
    land_near: RGB
    night: bool


def pick_palette(rng: random.Random) -> Palette:
    """A time of day, with every hue turned by a random amount so no two look alike."""
    shift = rng.uniform(-0.09, 0.09)
    mood = MOODS[rng.choice(MOOD_DRAW)]

    def turned(colour: HSL) -> RGB:
        return hsl(colour[0] + shift, colour[1], colour[2])

    top, mid, horizon = (turned(colour) for colour in mood.sky)
    return Palette(
        sky_top=top,
        sky_mid=mid,
        horizon=horizon,
        sun=mood.sun,
        glow=mood.glow,
        glow_strength=mood.glow_strength,
        cloud=turned(mood.cloud),
        land_far=mix(horizon, turned(mood.far_tint), mood.far_mix),
        land_near=turned(mood.near),
        night=mood.night,
    )


def vertical_gradient(size: tuple[int, int], stops: list[tuple[float, RGB]]) -> Image.Image:
    """Colour stops (position 0..1 from the top, colour), interpolated linearly."""
    width, height = size
    column = Image.new("RGB", (1, height))
    pixels = []
    for y in range(height):
        t = y / max(height - 1, 1)
        for (t0, c0), (t1, c1) in itertools.pairwise(stops):
            if t <= t1 or (t1, c1) == stops[-1]:
                pixels.append(mix(c0, c1, min(max((t - t0) / max(t1 - t0, 1e-9), 0.0), 1.0)))
                break
    column.putdata(pixels)
    return column.resize((width, height), Image.Resampling.NEAREST)


def glow_mask(diameter: int, strength: float) -> Image.Image:
    """A soft round light: opaque-ish in the middle, fading to nothing at the rim."""
    fade = [round(255 * strength * max(0.0, 1 - d / 255) ** 2.2) for d in range(256)]
    diameter = max(diameter, 1)
    return Image.radial_gradient("L").point(fade).resize((diameter, diameter))


def ridge(rng: random.Random, points: int, roughness: float) -> list[float]:
    """Midpoint displacement: heights in about -1..1, detail shrinking by `roughness`."""
    heights = [0.0] * points
    heights[0], heights[-1] = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6)
    step, amplitude = points - 1, 1.0
    while step > 1:
        half = step // 2
        for start in range(0, points - 1, step):
            middle = (heights[start] + heights[start + step]) / 2
            heights[start + half] = middle + rng.uniform(-amplitude, amplitude)
        step, amplitude = half, amplitude * roughness
    return heights


def paint_sky(
    size: tuple[int, int],
    palette: Palette,
    rng: random.Random,
    sun: tuple[float, float],
    horizon_y: float,
) -> Image.Image:
    width, height = size
    small = (max(width // SKY_SCALE, 4), max(height // SKY_SCALE, 4))
    sky = vertical_gradient(
        small,
        [
            (0.0, palette.sky_top),
            (horizon_y * 0.55, palette.sky_mid),
            (horizon_y, palette.horizon),
            (1.0, palette.horizon),
        ],
    )
    # The glow is wide and flat along the horizon, like light scattered by the haze.
    diameter = round(max(small) * rng.uniform(1.1, 1.6))
    glow = glow_mask(diameter, palette.glow_strength).resize((diameter * 2, diameter))
    sky.paste(
        palette.glow,
        (round(sun[0] * small[0] - diameter), round(sun[1] * small[1] - diameter / 2)),
        glow,
    )
    if not palette.night or rng.random() < 0.5:
        paint_clouds(sky, palette, rng, horizon_y)
    return sky.resize(size, Image.Resampling.BICUBIC)


def paint_clouds(sky: Image.Image, palette: Palette, rng: random.Random, horizon_y: float) -> None:
    width, height = sky.size
    mask = Image.new("L", sky.size)
    draw = ImageDraw.Draw(mask)
    for _ in range(rng.randint(2, 6)):
        cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(0.08, horizon_y * 0.8) * height
        long, tall = rng.uniform(0.15, 0.45) * width, rng.uniform(0.015, 0.05) * height
        for _ in range(rng.randint(2, 4)):
            dx, dy = rng.uniform(-0.5, 0.5) * long, rng.uniform(-1, 1) * tall
            draw.ellipse(
                (cx + dx - long / 2, cy + dy - tall, cx + dx + long / 2, cy + dy + tall),
                fill=rng.randint(90, 170),
            )
    mask = mask.filter(ImageFilter.GaussianBlur(max(width, height) / 60))
    sky.paste(palette.cloud, (0, 0), mask)


def disc_mask(radius: float, crescent: float) -> Image.Image:
    """An antialiased disc; with crescent > 0 a second disc shifted by that much is cut out."""
    big = SUPERSAMPLE * 4
    side = int(radius * 2 + 4)
    mask = Image.new("L", (side * big, side * big))
    box = (2 * big, 2 * big, (side - 2) * big, (side - 2) * big)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    if crescent:
        cut = Image.new("L", mask.size)
        offset = crescent * radius * big
        ImageDraw.Draw(cut).ellipse(
            (box[0] + offset, box[1] - offset / 3, box[2] + offset, box[3] - offset / 3), fill=255
        )
        mask = ImageChops.subtract(mask, cut)
    return mask.resize((side, side), Image.Resampling.BOX)


def paint_celestial(
    canvas: Image.Image, palette: Palette, rng: random.Random, sun: tuple[float, float]
) -> None:
    width, height = canvas.size
    radius = min(width, height) * rng.uniform(0.045, 0.085)
    crescent = rng.choice((0.0, rng.uniform(0.35, 0.6))) if palette.night else 0.0
    mask = disc_mask(radius, crescent)
    corner = (round(sun[0] * width - mask.width / 2), round(sun[1] * height - mask.height / 2))
    halo = glow_mask(round(radius * 5), 0.45 if palette.night else 0.7)
    canvas.paste(
        palette.glow,
        (round(sun[0] * width - halo.width / 2), round(sun[1] * height - halo.height / 2)),
        halo,
    )
    canvas.paste(palette.sun, corner, mask)


def paint_stars(canvas: Image.Image, rng: random.Random, horizon_y: float) -> None:
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    for _ in range(width * height // 900):
        x, y = rng.uniform(0, width), rng.uniform(0, horizon_y * height) * rng.random() ** 0.3
        shade = rng.randint(120, 255)
        colour = (shade, shade, min(255, shade + 20))
        if rng.random() < 0.06:
            draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=colour)
        else:
            draw.point((x, y), fill=colour)


def paint_mountains(
    canvas: Image.Image,
    palette: Palette,
    rng: random.Random,
    span: tuple[float, float],
    layers: int,
    trees: bool,
) -> None:
    """Far to near: higher, hazier ranges first, each nearer one darker and lower."""
    width, height = canvas.size
    horizon_y, ground_y = span
    bottom = round(ground_y * height)
    for layer in range(layers):
        depth = layer / (layers - 1)
        base = horizon_y + (ground_y - horizon_y) * (0.05 + 0.75 * depth)
        amplitude = (0.2 - 0.12 * depth) * rng.uniform(0.7, 1.3)
        heights = ridge(rng, 65, rng.uniform(0.45, 0.6) if depth < 0.6 else rng.uniform(0.35, 0.5))
        ys = [(base - amplitude * (0.5 + 0.5 * h)) * height for h in heights]
        wooded = trees and layer == layers - 1
        # Room above the ridge for the tallest tree, or its top would be cut flat.
        top = max(0, int(min(ys) - (40 * height / 512 if wooded else 2)))
        if top >= bottom:
            continue
        s = SUPERSAMPLE
        mask = Image.new("L", (width * s, (bottom - top) * s))
        points = [
            (i * (width + 2) / (len(ys) - 1) * s - s, (y - top) * s) for i, y in enumerate(ys)
        ]
        draw = ImageDraw.Draw(mask)
        draw.polygon([*points, (width * s + s, mask.height), (-s, mask.height)], fill=255)
        if wooded:
            paint_trees(draw, rng, points, s * height / 512)
        mask = mask.reduce(s)
        colour = mix(palette.land_far, palette.land_near, depth**0.8)
        mist = mix(colour, palette.horizon, 0.35 * (1 - depth) + 0.1)
        fill = vertical_gradient(
            (width, bottom - top), [(0.0, colour), (0.6, mix(colour, mist, 0.6)), (1.0, mist)]
        )
        canvas.paste(fill, (0, top), mask)


def paint_trees(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    ridge_points: list[tuple[float, float]],
    scale: float,
) -> None:
    """Groves of tiered conifers standing on the nearest ridge, with clearings between."""
    density = ridge(rng, len(ridge_points), 0.55)
    for i, ((x0, y0), (x1, y1)) in enumerate(itertools.pairwise(ridge_points)):
        for _ in range(int(max(0.0, density[i]) * 6)):
            t = rng.random()
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + 3 * scale
            tall = rng.uniform(12, 34) * scale * (0.6 + 0.5 * max(0.0, density[i]))
            wide = tall * rng.uniform(0.22, 0.3)
            for tier in range(3):
                foot = y - tall * tier * 0.27
                half = wide * (1 - tier * 0.25)
                draw.polygon(
                    [(x - half, foot), (x, foot - tall * 0.46), (x + half, foot)], fill=255
                )


def paint_lake(
    canvas: Image.Image, palette: Palette, rng: random.Random, shore_y: float, sun_x: float
) -> None:
    """Mirror what is above the shore line, smeared and darkened, with ripples of light."""
    width, height = canvas.size
    shore = round(shore_y * height)
    depth = height - shore
    if depth < 4 or shore < depth:
        return
    mirror = canvas.crop((0, shore - depth, width, shore)).transpose(
        Image.Transpose.FLIP_TOP_BOTTOM
    )
    # Squashing then stretching back blurs vertically only, like a slightly rippled surface.
    mirror = mirror.resize((width, max(depth // 4, 1)), Image.Resampling.BOX).resize(
        (width, depth), Image.Resampling.BILINEAR
    )
    tint = mix(palette.sky_mid, palette.land_near, 0.55)
    water = Image.composite(
        Image.new("RGB", mirror.size, tint),
        mirror,
        vertical_gradient((1, depth), [(0.0, (90, 90, 90)), (1.0, (150, 150, 150))])
        .convert("L")
        .resize(mirror.size),
    )
    draw = ImageDraw.Draw(water)
    for _ in range(depth):
        y = rng.uniform(0, depth - 1)
        length = rng.uniform(0.02, 0.12) * width * (0.5 + y / depth)
        x = rng.gauss(sun_x * width, width * 0.06) if rng.random() < 0.5 else rng.uniform(0, width)
        near_sun = abs(x - sun_x * width) < width * 0.1
        light = mix(palette.horizon, palette.glow, 0.6) if near_sun else palette.sky_mid
        under = water.getpixel((min(max(int(x), 0), width - 1), int(y)))
        draw.line(
            (x - length / 2, y, x + length / 2, y),
            fill=mix(light, under, 0.55 if near_sun else 0.75),
        )
    canvas.paste(water, (0, shore))


def paint(width: int, height: int, prompt: str, seed: int, index: int) -> Image.Image:
    """The placeholder picture for image `index` of a run with this prompt and seed."""
    rng = scene_rng(prompt, seed, index)
    palette = pick_palette(rng)
    horizon_y = rng.uniform(0.5, 0.68)
    lake = rng.random() < 0.4
    ground_y = rng.uniform(0.74, 0.82) if lake else 1.0
    sun = (rng.uniform(0.15, 0.85), rng.uniform(0.18, horizon_y - 0.08))
    canvas = paint_sky((width, height), palette, rng, sun, horizon_y)
    if palette.night:
        paint_stars(canvas, rng, horizon_y)
    paint_celestial(canvas, palette, rng, sun)
    if lake:
        paint_mountains(
            canvas, palette, rng, (horizon_y, ground_y), rng.randint(2, 4), rng.random() < 0.3
        )
    else:
        paint_mountains(
            canvas, palette, rng, (horizon_y, ground_y), rng.randint(3, 5), rng.random() < 0.6
        )
    if lake:
        paint_lake(canvas, palette, rng, ground_y, sun[0])
    return canvas
