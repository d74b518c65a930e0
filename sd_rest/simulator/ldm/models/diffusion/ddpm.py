"""The simulated latent diffusion model, built like the real one: its constructor builds its
networks with nested `instantiate_from_config` calls, and their random initialisation draws
from torch's generator after the script has seeded it and before the sampler draws its noise.
A process that kept a built model must therefore leave the generator where a build would."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import simknobs
from torch import Tensor, nn

from ldm.models.autoencoder import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


class DiffusionWrapper(nn.Module):
    def __init__(self, diff_model_config: Any) -> None:
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)


class LatentDiffusion(nn.Module):
    def __init__(
        self,
        unet_config: Any,
        first_stage_config: Any,
        cond_stage_config: Any,
        use_ema: bool = True,
        scale_factor: float = 1.0,
        **_: Any,
    ) -> None:
        super().__init__()
        print("LatentDiffusion: Running in eps-prediction mode", flush=True)
        self.model = DiffusionWrapper(unet_config)
        unet = self.model.diffusion_model
        print(f"DiffusionWrapper has {unet.reported_params:.2f} M params.", flush=True)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
            print(f"Keeping EMAs of {unet.reported_tensors}.", flush=True)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        if cond_stage_config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        else:
            self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.scale_factor = scale_factor
        time.sleep(simknobs.knobs().build_seconds)
        simknobs.event("build", model=type(self).__name__)

    @contextmanager
    def ema_scope(self) -> Iterator[None]:
        """Sample with the EMA weights, then put the model's own back (as the real one does:
        an interrupt before the `try` leaves the EMA weights in)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())

    def encode_first_stage(self, latent_shape: tuple[int, ...]) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(latent_shape)

    def get_first_stage_encoding(self, posterior: DiagonalGaussianDistribution) -> Tensor:
        return posterior.sample()

    def decode_first_stage(self, samples: Tensor) -> list[int]:
        """What each latent of the batch decodes to: a number that picks its placeholder
        picture, a function of the latent and of the weights the model holds now."""
        weights = hashlib.sha256()
        for tensor in self.state_dict().values():
            weights.update(tensor.numpy().tobytes())
        pictures = []
        for latent in (samples[j] for j in range(len(samples))):
            digest = hashlib.sha256(weights.digest() + latent.numpy().tobytes()).digest()
            pictures.append(int.from_bytes(digest[:8], "big"))
        return pictures
