"""Simulator stand-in for the fork's scripts/img2img.py: same flags, output, bars and
failures; the init image is blended with a placeholder landscape by --strength. It is built
like the real script: seed_everything, load_model_from_config through torch.load and
instantiate_from_config, then the first stage's encoding noise and the sampler's noise, both
drawn from torch's generator."""

from __future__ import annotations

import os
from typing import Any

# Like the real img2img, this needs the repository root on PYTHONPATH. The simulator's
# stand-ins for torch and the other libraries live there too, so ldm is imported first: without
# the root the script fails on ldm, as the real one does.
from ldm import simulate as sim
from ldm.progress import track
from ldm.scenery import paint
from ldm.util import instantiate_from_config

# isort: split
import torch
from omegaconf import OmegaConf
from PIL import Image


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
    sim.seed_everything(opt.seed)

    config = OmegaConf.load(f"{opt.config}")
    model = load_model_from_config(config, f"{opt.ckpt}")
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
    # The same UNet as txt2img: a size that is a multiple of 32 but not of 64 fails.
    latent = (init_image.height // 8, init_image.width // 8)
    posterior = model.encode_first_stage((batch_size, opt.C, *latent))
    init_latent = model.get_first_stage_encoding(posterior)  # move to latent space

    sampler.make_schedule(opt.ddim_steps, opt.ddim_eta)
    assert 0.0 <= opt.strength <= 1.0, "can only work with strength in [0.0, 1.0]"
    t_enc = int(opt.strength * opt.ddim_steps)
    print(f"target t_enc is {t_enc} steps", flush=True)

    with model.ema_scope():
        all_samples = []
        for _ in track(range(opt.n_iter), desc="Sampling"):
            for prompts in track(data, desc="data"):
                z_enc = sampler.stochastic_encode(init_latent, t_enc)
                samples = sampler.decode(z_enc, t_enc, lambda: sim.check_unet_sizes(*latent))
                images = []
                for j, picture in enumerate(model.decode_first_stage(samples)):
                    pattern = paint(*init_image.size, prompts[j % len(prompts)], picture, 0)
                    images.append(Image.blend(init_image, pattern, opt.strength))

                if not opt.skip_save:
                    for image in images:
                        path = os.path.join(sample_path, f"{base_count:05}.png")
                        sim.save_png(image, path, run)
                        base_count += 1
                all_samples.extend(images)

        if not opt.skip_grid:
            grid = sim.make_grid(all_samples, n_rows)
            sim.save_png(grid, os.path.join(outpath, f"grid-{grid_count:04}.png"), run)

    sim.finish(outpath)


if __name__ == "__main__":
    main()
