"""The simulated latent diffusion model."""
