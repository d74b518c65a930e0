"""The simulated models (see ldm/models/diffusion/ddpm.py)."""
