"""Simulator stand-in for the fork's scripts/img2img.py: same flags, output, bars and
failures; the init image is blended with a placeholder landscape by --strength."""

from __future__ import annotations

import os

# Like the real img2img, this needs the repository root on PYTHONPATH.
from ldm import simulate as sim
from ldm.progress import track
from ldm.scenery import paint
from PIL import Image


def load_img(path: str) -> Image.Image:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    print(f"loaded input image of size ({w}, {h}) from {path}", flush=True)
    w, h = (x - x % 32 for x in (w, h))
    return image.resize((w, h), resample=Image.Resampling.LANCZOS)


def main() -> None:
    run = sim.start("img2img")
    opt = sim.sampling_parser("img2img").parse_args()
    if opt.laion400m:
        sim.laion400m_fallback(opt, "img2img")
    seed = sim.seed_everything(opt.seed)

    config = sim.load_config(opt.config)
    sim.load_model_from_config(config, opt.ckpt, run)
    if opt.plms:
        raise NotImplementedError("PLMS sampler not (yet) supported")
    sampler = sim.Sampler("DDIM", run)

    os.makedirs(opt.outdir, exist_ok=True)
    outpath = opt.outdir

    batch_size = opt.n_samples
    n_rows = opt.n_rows if opt.n_rows > 0 else batch_size
    data = sim.prompt_batches(opt.prompt, opt.from_file, batch_size)

    sample_path = os.path.join(outpath, "samples")
    os.makedirs(sample_path, exist_ok=True)
    base_count = len(os.listdir(sample_path))
    grid_count = len(os.listdir(outpath)) - 1

    assert os.path.isfile(opt.init_img)
    init_image = load_img(opt.init_img)

    sampler.make_schedule(opt.ddim_steps, opt.ddim_eta)
    assert 0.0 <= opt.strength <= 1.0, "can only work with strength in [0.0, 1.0]"
    t_enc = int(opt.strength * opt.ddim_steps)
    print(f"target t_enc is {t_enc} steps", flush=True)

    all_samples = []
    made = 0
    for _ in track(range(opt.n_iter), desc="Sampling"):
        for prompts in track(data, desc="data"):
            sampler.stochastic_encode(t_enc)
            # The same UNet as txt2img: a size that is a multiple of 32 but not of 64 fails.
            latent = (init_image.height // 8, init_image.width // 8)
            sampler.decode(t_enc, lambda latent=latent: sim.check_unet_sizes(*latent))
            images = []
            for j in range(batch_size):
                index = j if opt.fixed_code else made + j
                pattern = paint(*init_image.size, prompts[j % len(prompts)], seed, index)
                images.append(Image.blend(init_image, pattern, opt.strength))
            made += batch_size

            if not opt.skip_save:
                for image in images:
                    sim.save_png(image, os.path.join(sample_path, f"{base_count:05}.png"), run)
                    base_count += 1
            all_samples.extend(images)

    if not opt.skip_grid:
        grid = sim.make_grid(all_samples, n_rows)
        sim.save_png(grid, os.path.join(outpath, f"grid-{grid_count:04}.png"), run)

    sim.finish(outpath)


if __name__ == "__main__":
    main()
