"""The simulated text encoder."""
