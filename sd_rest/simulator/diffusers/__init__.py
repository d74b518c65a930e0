"""The simulator's stand-in for diffusers: only the safety checker txt2img loads."""
