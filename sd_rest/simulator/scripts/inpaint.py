"""Simulator stand-in for the fork's scripts/inpaint.py: repaints the white part of each
mask with a placeholder landscape. Like the real script it has no seed flag (its noise comes
from torch's generator, which a sitecustomize module may have seeded), builds its model with
main.instantiate_from_config and loads its config and checkpoint from paths relative to the
working directory."""

from __future__ import annotations

import argparse
import glob
import os

# Like the real inpaint, this needs the repository root on PYTHONPATH (ldm first: see img2img).
from ldm import simulate as sim
from ldm.progress import track
from ldm.scenery import paint

# isort: split
import torch
from main import instantiate_from_config
from omegaconf import OmegaConf
from PIL import Image

MASK_THRESHOLD = 128  # a mask value of at least 0.5 × 255 means "repaint"


def check_broadcast(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """`(1 - mask) * image` on (1,1,h,w) and (1,3,H,W) tensors: trailing dimensions first."""
    for dim, a, b in ((3, mask_size[0], image_size[0]), (2, mask_size[1], image_size[1])):
        if a != b:
            raise RuntimeError(
                f"The size of tensor a ({a}) must match the size of tensor b ({b}) "
                f"at non-singleton dimension {dim}"
            )


def make_batch(image_path: str, mask_path: str) -> tuple[Image.Image, Image.Image]:
    image = Image.open(image_path).convert("RGB")
    mask = Image.open(mask_path).convert("L").point(lambda v: 255 if v >= MASK_THRESHOLD else 0)
    check_broadcast(mask.size, image.size)
    return image, mask


def vq_latent_side(side: int) -> int:
    """The f=4 VQ encoder: two stride-2 convolutions after a (0, 1) pad."""
    for _ in range(2):
        side = (side - 2) // 2 + 1
    return side


def check_unet_skips(width: int, height: int) -> None:
    """inpainting_big's UNet downsamples three times by average pooling (resblock_updown), which
    floors odd sides, so its skip connections line up only for latents that are multiples of
    8: images that are multiples of 32."""
    for side in (height, width):
        sizes = [vq_latent_side(side)]
        for _ in range(3):
            sizes.append(sizes[-1] // 2)
        upsampled = sizes[-1]
        for skip in reversed(sizes[:-1]):
            upsampled *= 2
            if upsampled != skip:
                raise RuntimeError(
                    "Sizes of tensors must match except in dimension 1. Expected size "
                    f"{upsampled} but got size {skip} for tensor number 1 in the list."
                )


def main() -> None:
    run = sim.start("inpaint")
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--indir",
        type=str,
        nargs="?",
        help="dir containing image-mask pairs (`example.png` and `example_mask.png`)",
    )
    parser.add_argument("--outdir", type=str, nargs="?", help="dir to write results to")
    parser.add_argument("--steps", type=int, default=50, help="number of ddim sampling steps")
    opt = parser.parse_args()

    masks = sorted(glob.glob(os.path.join(opt.indir, "*_mask.png")))
    images = [x.replace("_mask.png", ".png") for x in masks]
    print(f"Found {len(masks)} inputs.", flush=True)

    config = OmegaConf.load("models/ldm/inpainting_big/config.yaml")
    model = instantiate_from_config(config.model)
    model.load_state_dict(
        torch.load("models/ldm/inpainting_big/last.ckpt")["state_dict"], strict=False
    )
    sampler = sim.Sampler("DDIM", run)

    os.makedirs(opt.outdir, exist_ok=True)
    with model.ema_scope():
        for image, mask in track(zip(images, masks, strict=False)):
            outpath = os.path.join(opt.outdir, os.path.split(image)[1])
            picture, region = make_batch(image, mask)
            width, height = picture.size
            samples = sampler.sample(
                opt.steps,
                1,
                (3, height // 4, width // 4),
                0.0,
                lambda width=width, height=height: check_unet_skips(width, height),
            )
            (repainted,) = model.decode_first_stage(samples)
            result = Image.composite(paint(width, height, "", repainted, 0), picture, region)
            sim.save_png(result, outpath, run)


if __name__ == "__main__":
    main()
