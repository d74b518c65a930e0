"""The simulated denoising network."""
