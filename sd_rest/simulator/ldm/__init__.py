"""The simulator's stand-in for the Stable Diffusion repository's `ldm` package.

Importable only with the repository root on sys.path (PYTHONPATH), like the real one.
"""
