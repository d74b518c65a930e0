"""The `info` of a txt2img or img2img answer: a JSON string with what made the images, in
AUTOMATIC1111's keys. Pure: built from the request, the plan, the job's image records and the
infotexts read from the job's own PNGs (so `infotexts[i]` is the image's `parameters` chunk,
byte for byte)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sd_rest.api.a1111.translate import Plan
from sd_rest.runs.labels import MODEL_HASH_LENGTH, NOT_HONOURED

TIMESTAMP_FORMAT: Final = "%Y%m%d%H%M%S"  # AUTOMATIC1111's job_timestamp


def build_info(
    request: Mapping[str, Any],
    plan: Plan,
    seeds: Sequence[int],
    infotexts: Sequence[str],
    model_name: str,
    model_sha256: str | None,
    started: float,
) -> dict[str, Any]:
    """`seeds`: each image's run seed (the scripts seed once per run: every image of one run
    has its seed, told apart by its position in the infotext)."""
    params = plan.params
    count = len(seeds)
    prompt = str(request.get("prompt") or "")
    negative = str(request.get("negative_prompt") or "")
    strength = params.get("strength")
    guidance = params.get("guidanceScale")  # none for inpainting, which runs without
    extra = {NOT_HONOURED: "; ".join(plan.notes)} if plan.notes else {}
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * count,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * count,
        "seed": plan.seed,
        "all_seeds": list(seeds),
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": int(request.get("width") or 0),
        "height": int(request.get("height") or 0),
        "sampler_name": plan.sampler,
        "cfg_scale": None if guidance is None else float(guidance),
        "steps": int(params["steps"]),
        "batch_size": int(params.get("batchSize", 1)),
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": model_sha256[:MODEL_HASH_LENGTH] if model_sha256 else None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": None if strength is None else float(strength),
        "extra_generation_params": extra,
        "index_of_first_image": 0,  # no grid comes first: the scripts run with --skip_grid
        "infotexts": list(infotexts),
        "styles": [],
        "job_timestamp": time.strftime(TIMESTAMP_FORMAT, time.localtime(started)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": plan.endpoint == "inpaint-image",
        "version": "sd-rest",
    }
