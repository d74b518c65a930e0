"""Benchmarks of what sd-rest costs on top of the scripts it runs: `python -m bench`.

Every measure runs a real server process (`python -m sd_rest --demo`) against the simulator with
fixed load and step times, and talks to it over HTTPS from other processes. See bench/RESULTS.md.
"""
