"""The stand-in for diffusers.pipelines.stable_diffusion."""
