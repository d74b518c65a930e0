"""No shell anywhere: every prompt reaches the script as exactly one argument, byte for byte,
and nothing it spells out runs. The simulator records its argv (SD_SIM_ARGV_LOG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import Server, png_bytes

# They count the simulator's runs and read its event log: no warm-up run (conftest.py).
pytestmark = pytest.mark.no_warm_start


def hostile_prompts(canary: Path) -> list[str]:
    return [
        "it's a \"quoted\" 'prompt'",
        f"$(touch {canary}-dollar)",
        f"`touch {canary}-backtick`",
        f"a; touch {canary}-semicolon",
        f"a && touch {canary}-and | tee {canary}-pipe",
        f"a\ntouch {canary}-newline\n",
        "--outdir=/tmp/elsewhere",
        "-h",
        "--ckpt /etc/passwd --seed 1",
        "日本語の灯台 🎨 ünïcödé ﷽",
        "back\\slash \\n and %s %n {} ${HOME} *",
        "tab\tcarriage\rreturn",
        " leading and trailing spaces ",
    ]


def runs(argv_log: Path) -> list[dict]:
    return [json.loads(line) for line in argv_log.read_text().splitlines()]


def test_every_prompt_is_one_verbatim_argument(make_server, tmp_path: Path) -> None:
    argv_log = tmp_path / "argv.jsonl"
    canary = tmp_path / "ran"
    server: Server = make_server(
        args=["--concurrency", "4"], env={"SD_SIM_ARGV_LOG": str(argv_log)}
    )
    prompts = hostile_prompts(canary)
    locations = []
    for number, prompt in enumerate(prompts):
        if number % 2:
            resp = server.post_json("text-to-image", {"prompt": prompt, "steps": 2})
        else:
            resp = server.post_form("text-to-image", {"prompt": prompt, "steps": "2"})
        assert resp.status == 303, (prompt, resp.body)
        locations.append(resp.headers["Location"])
    image = server.post_form(
        "image-to-image", {"prompt": prompts[1], "steps": "4"}, {"image": png_bytes(256, 256)}
    )
    assert image.status == 303, image.body
    locations.append(image.headers["Location"])
    for location in locations:
        assert server.wait_status(location, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"

    recorded = runs(argv_log)
    assert len(recorded) == len(prompts) + 1  # one run per job, nothing else ran
    seen = []
    for run in recorded:
        argv = run["argv"]
        prompt_args = [arg for arg in argv if arg.startswith("--prompt=")]
        assert len(prompt_args) == 1, argv
        seen.append(prompt_args[0].removeprefix("--prompt="))
        # The script's own flags are ours, each exactly once, whatever the prompt says.
        for flag in ("--outdir=", "--ckpt=", "--seed="):
            assert sum(arg.startswith(flag) for arg in argv) == 1, argv
        assert "-h" not in argv
    assert sorted(seen) == sorted([*prompts, prompts[1]])
    assert not list(tmp_path.glob("ran*")), "a prompt was run as a command"
