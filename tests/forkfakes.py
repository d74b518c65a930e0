"""Throwaway inputs for the setup.sh and --check tests: a fork-shaped tree (as a git repository
or an archive), a real venv without torch, checkpoints in torch.save's zip layout, and
certificates with chosen dates. Everything is made for real; nothing here is the fork."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from datetime import datetime
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"
BRANCH = "apple-silicon-mps-support"
FORK_FILES = (
    "scripts/txt2img.py",
    "scripts/img2img.py",
    "scripts/inpaint.py",
    "configs/stable-diffusion/v1-inference.yaml",
    "models/ldm/inpainting_big/config.yaml",
    "ldm/__init__.py",
    "main.py",
)


def fork_tree(root: Path, marker: str = "one") -> Path:
    for name in FORK_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {marker}\n")
    return root


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def git_fork(root: Path) -> tuple[Path, str, str]:
    """A git repository with the fork's layout on BRANCH, two commits: (path, first, second)."""
    fork_tree(root, "one")
    git("init", "--quiet", "--initial-branch", BRANCH, cwd=root)
    git("add", ".", cwd=root)
    git("commit", "--quiet", "-m", "one", cwd=root)
    first = git("rev-parse", "HEAD", cwd=root)
    (root / "scripts" / "txt2img.py").write_text("# two\n")
    git("commit", "--quiet", "-am", "two", cwd=root)
    return root, first, git("rev-parse", "HEAD", cwd=root)


def fork_archive(folder: Path, top: str = "stable-diffusion-3c9f69e") -> Path:
    """A .tar.gz of a fork-shaped tree inside one top folder, as GitHub's archives are."""
    tree = fork_tree(folder / "tree" / top)
    archive = folder / f"{top}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=top)
    return archive


def venv_without_torch(path: Path) -> Path:
    """A real venv (no pip: not needed, and faster) whose interpreter has nothing installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def torch_zip_checkpoint(path: Path, payload: int = 2 * 1024 * 1024) -> Path:
    """A file laid out as torch.save (torch >= 1.6) writes one: a stored zip holding
    <name>/data.pkl and the tensors' bytes under <name>/data/."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}}, protocol=2))
        archive.writestr("archive/data/0", os.urandom(payload))
        archive.writestr("archive/version", "3\n")
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    with path.open("r+b") as file:
        file.truncate(int(path.stat().st_size * fraction))
    return path


def certificate_pair(
    folder: Path,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    name: str = "cert",
) -> tuple[Path, Path]:
    """A certificate for localhost/127.0.0.1 (with the dates asked for) and its key."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", not_before=not_before, not_after=not_after)
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key
