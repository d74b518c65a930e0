"""The real fork's kit is built once per kit and cache folder (bench/forkkit.py), however many
processes ask at once, and again only when the kit changes: its prepare.sh pulls the fork out
from under any script that runs meanwhile. A stand-in kit whose prepare.sh counts its runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import forkkit
from helpers import ROOT

PREPARE = """\
#!/usr/bin/env bash
set -e
echo run >> "$1/runs"
sleep 0.5  # long enough for the other builders to be waiting
mkdir -p "$1/stable-diffusion/venv/bin"
touch "$1/stable-diffusion/venv/bin/python"
{extra}
"""


def make_kit(folder: Path, extra: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "prepare.sh").write_text(PREPARE.format(extra=extra))
    return folder


def runs(root: Path) -> int:
    return len((root / "runs").read_text().splitlines()) if (root / "runs").exists() else 0


def test_built_once_by_many_processes_and_again_when_the_kit_changes(tmp_path: Path) -> None:
    kit, root = make_kit(tmp_path / "kit"), tmp_path / "cache"
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from bench import forkkit
        print(forkkit.build(Path({str(kit)!r}), Path({str(root)!r})))
    """)
    builders = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [builder.communicate(timeout=60)[0].strip() for builder in builders]
    assert [builder.returncode for builder in builders] == [0] * 4
    assert set(outputs) == {str(root / "stable-diffusion")}
    assert runs(root) == 1

    forkkit.build(kit, root)
    assert runs(root) == 1
    make_kit(kit, extra="# a new version of the kit")
    forkkit.build(kit, root)
    assert runs(root) == 2
    (root / "stable-diffusion" / "venv" / "bin" / "python").unlink()  # a build half removed
    forkkit.build(kit, root)
    assert runs(root) == 3


def test_a_failed_build_says_why_and_is_tried_again(tmp_path: Path) -> None:
    kit, root = make_kit(tmp_path / "kit", extra="echo 'no space left' >&2; exit 3"), tmp_path / "c"
    with pytest.raises(RuntimeError, match=r"prepare.sh failed \(3\):\n.*no space left"):
        forkkit.build(kit, root)
    with pytest.raises(RuntimeError):
        forkkit.build(kit, root)
    assert runs(root) == 2
