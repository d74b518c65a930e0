"""Simulator stand-in for the fork's scripts/txt2img.py: same flags, output, bars and
failures, with placeholder landscapes instead of a diffusion model. It is built like the real
script: a module-level safety checker, then seed_everything, load_model_from_config through
torch.load and instantiate_from_config, and noise drawn from torch's generator."""

from __future__ import annotations

import os
import sys
from typing import Any

# Like the real txt2img, this one finds the repository's modules on its own (here before the
# imports: the simulator's stand-ins for torch and the other libraries live there too).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from ldm import simulate as sim
from ldm.progress import track
from ldm.scenery import paint
from ldm.util import instantiate_from_config
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoFeatureExtractor

# load safety model
safety_model_id = "CompVis/stable-diffusion-safety-checker"
safety_feature_extractor = AutoFeatureExtractor.from_pretrained(safety_model_id)
safety_checker = StableDiffusionSafetyChecker.from_pretrained(safety_model_id)


def load_model_from_config(config: Any, ckpt: str, verbose: bool = False) -> Any:
    print(f"Loading model from {ckpt}", flush=True)
    pl_sd = torch.load(ckpt, map_location="cpu")
    if "global_step" in pl_sd:
        print(f"Global Step: {pl_sd['global_step']}", flush=True)
    sd = pl_sd["state_dict"]
    model = instantiate_from_config(config.model)
    m, u = model.load_state_dict(sd, strict=False)
    if len(m) > 0 and verbose:
        print("missing keys:")
        print(m)
    if len(u) > 0 and verbose:
        print("unexpected keys:")
        print(u)
    model.eval()
    return model


def check_safety(images: list[Image.Image]) -> list[Image.Image]:
    safety_checker_input = safety_feature_extractor(images, return_tensors="pt")
    checked, _ = safety_checker(images=images, clip_input=safety_checker_input.pixel_values)
    return checked


def main() -> None:
    run = sim.start("txt2img")
    opt = sim.sampling_parser("txt2img").parse_args()
    if opt.laion400m:
        sim.laion400m_fallback(opt, "txt2img")
    sim.seed_everything(opt.seed)

    config = OmegaConf.load(f"{opt.config}")
    model = load_model_from_config(config, f"{opt.ckpt}")
    sampler = sim.Sampler("PLMS" if opt.plms else "DDIM", run)

    os.makedirs(opt.outdir, exist_ok=True)
    outpath = opt.outdir
    print(
        "Creating invisible watermark encoder "
        "(see https://github.com/ShieldMnt/invisible-watermark)...",
        flush=True,
    )
    wm_encoder = sim.WatermarkEncoder()

    batch_size = opt.n_samples
    n_rows = opt.n_rows if opt.n_rows > 0 else batch_size
    data = sim.prompt_batches(opt.prompt, opt.from_file, batch_size)

    sample_path = os.path.join(outpath, "samples")
    os.makedirs(sample_path, exist_ok=True)
    base_count = len(os.listdir(sample_path))
    grid_count = len(os.listdir(outpath)) - 1

    latent = (opt.H // opt.f, opt.W // opt.f)
    start_code = None
    if opt.fixed_code:  # the same noise, hence the same pictures, for every batch
        start_code = torch.randn([opt.n_samples, opt.C, *latent])

    with model.ema_scope():
        all_samples = []
        for _ in track(range(opt.n_iter), desc="Sampling"):
            for prompts in track(data, desc="data"):
                samples = sampler.sample(
                    opt.ddim_steps,
                    batch_size,
                    (opt.C, *latent),
                    opt.ddim_eta,
                    lambda: sim.check_unet_sizes(*latent),
                    x_T=start_code,
                )
                # The decoder turns each latent pixel into 8×8 pixels.
                size = (latent[1] * 8, latent[0] * 8)
                pictures = [
                    paint(*size, prompts[j % len(prompts)], picture, 0)
                    for j, picture in enumerate(model.decode_first_stage(samples))
                ]
                images = check_safety(pictures)

                if not opt.skip_save:
                    for image in images:
                        marked = sim.put_watermark(image, wm_encoder)
                        path = os.path.join(sample_path, f"{base_count:05}.png")
                        sim.save_png(marked, path, run)
                        base_count += 1
                if not opt.skip_grid:
                    all_samples.extend(images)

        if not opt.skip_grid:
            grid = sim.put_watermark(sim.make_grid(all_samples, n_rows), wm_encoder)
            sim.save_png(grid, os.path.join(outpath, f"grid-{grid_count:04}.png"), run)

    sim.finish(outpath)


if __name__ == "__main__":
    main()
