"""The simulated networks."""
