"""Simulator stand-in for the fork's scripts/txt2img.py: same flags, output, bars and
failures, with placeholder landscapes instead of a diffusion model."""

from __future__ import annotations

import os
import sys

# Like the real txt2img, this one finds the repository's modules on its own.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm import simulate as sim
from ldm.progress import track
from ldm.scenery import paint


def main() -> None:
    run = sim.start("txt2img")
    opt = sim.sampling_parser("txt2img").parse_args()
    if opt.laion400m:
        sim.laion400m_fallback(opt, "txt2img")
    seed = sim.seed_everything(opt.seed)

    config = sim.load_config(opt.config)
    sim.load_model_from_config(config, opt.ckpt, run)
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

    all_samples = []
    made = 0
    for _ in track(range(opt.n_iter), desc="Sampling"):
        for prompts in track(data, desc="data"):
            latent = (opt.H // opt.f, opt.W // opt.f)
            sampler.sample(
                opt.ddim_steps,
                batch_size,
                (opt.C, *latent),
                opt.ddim_eta,
                lambda latent=latent: sim.check_unet_sizes(*latent),
            )
            # The decoder turns each latent pixel into 8×8 pixels.
            size = (latent[1] * 8, latent[0] * 8)
            images = []
            for j in range(batch_size):
                # A fixed start code repeats the same noise, hence the same image, every batch.
                index = j if opt.fixed_code else made + j
                images.append(paint(*size, prompts[j % len(prompts)], seed, index))
            made += batch_size

            if not opt.skip_save:
                for image in images:
                    marked = sim.put_watermark(image, wm_encoder)
                    sim.save_png(marked, os.path.join(sample_path, f"{base_count:05}.png"), run)
                    base_count += 1
            if not opt.skip_grid:
                all_samples.extend(images)

    if not opt.skip_grid:
        grid = sim.put_watermark(sim.make_grid(all_samples, n_rows), wm_encoder)
        sim.save_png(grid, os.path.join(outpath, f"grid-{grid_count:04}.png"), run)

    sim.finish(outpath)


if __name__ == "__main__":
    main()
