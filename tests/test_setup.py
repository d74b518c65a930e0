"""scripts/setup.sh: each step against real sources (a git fork, an archive, file:// downloads,
openssl), its errors, its idempotence, and (marked real_fork) the whole set-up from an empty
folder followed by one job per endpoint on a server started there with no flags."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from sd_rest.setup import check, checkpoints, fork_imports

from forkfakes import (
    BRANCH,
    SETUP,
    fork_archive,
    fork_tree,
    git_fork,
    torch_zip_checkpoint,
    venv_without_torch,
)
from helpers import Server
from realfork import KIT_ENV, RealFork

SCRIPTS = SETUP.parent


def setup(
    *steps: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SD_REST_")}
    return subprocess.run(
        ["bash", str(SETUP), *steps],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    return result.stderr.strip().splitlines()[-1]


def pins(path: Path) -> dict[str, str]:
    pinned = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pinned


def names(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [re.sub(r"[-_.]+", "-", line).lower() for line in lines if line]


# --- the script and its package lists -------------------------------------------------------


def test_setup_is_valid_bash_and_documents_every_override() -> None:
    subprocess.run(["bash", "-n", str(SETUP)], check=True)
    text = SETUP.read_text()
    assert text.splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in text
    header = text.split("set -euo pipefail", 1)[0]
    used = set(re.findall(r"SD_REST_[A-Z0-9_]+", text.split("set -euo pipefail", 1)[1]))
    assert used, "no override found"
    for name in used:
        assert name in header, f"{name} is not documented in the header"
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SETUP)], check=True)


def test_every_requirement_is_pinned_and_the_lists_agree() -> None:
    pinned = pins(SCRIPTS / "fork-constraints.txt")
    required = names(SCRIPTS / "fork-requirements.txt")
    no_deps = names(SCRIPTS / "fork-requirements-no-deps.txt")
    for name in [*required, *no_deps]:
        assert name in pinned, f"{name} has no pin"
    assert no_deps == list(fork_imports.NO_DEPS)
    # Everything the import check blames must be something setup.sh installs.
    blamed = {d for *_, d in fork_imports.IMPORTS if d} | set(fork_imports.DISTRIBUTIONS.values())
    for name in blamed:
        assert re.sub(r"[-_.]+", "-", name).lower() in pinned, name
    # The fork's own list is not used: no git URLs, no `-e .`, no index.
    for path in SCRIPTS.glob("fork-*.txt"):
        for entry in names(path):
            assert "git+" not in entry and not entry.startswith("-"), entry
    assert pinned["pytorch-lightning"] == "1.9.5" and pinned["setuptools"].startswith("80.")


def test_setup_and_check_know_the_same_published_checksum() -> None:
    published = re.search(r"SD_V1_4_SHA256=([0-9a-f]{64})", SETUP.read_text())
    assert published is not None
    assert [sha for _, sha in checkpoints.KNOWN_CHECKPOINTS.values()] == [published.group(1)]


def test_unknown_step(tmp_path: Path) -> None:
    result = setup("everything", env={"SD_REST_DIR": str(tmp_path)})
    assert "unknown step everything" in error(result)


# --- fork ------------------------------------------------------------------------------------


def test_fork_from_a_local_clone_at_the_pinned_commit(tmp_path: Path) -> None:
    source, first, _ = git_fork(tmp_path / "source")
    env = {"SD_REST_DIR": str(tmp_path / "home"), "SD_REST_FORK": str(source)}
    result = setup("fork", env={**env, "SD_REST_FORK_COMMIT": first})
    assert result.returncode == 0, result.stderr
    repo = tmp_path / "home" / "vendor" / "stable-diffusion"
    assert (repo / "scripts" / "txt2img.py").read_text() == "# one\n"
    assert (
        subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        == first
    )
    again = setup("fork", env=env)
    assert again.returncode == 0 and "is already there" in again.stdout
    assert (repo / "scripts" / "txt2img.py").read_text() == "# one\n"


def test_fork_from_a_git_url_at_the_branch_tip(tmp_path: Path) -> None:
    source, _, second = git_fork(tmp_path / "source")
    env = {
        "SD_REST_DIR": str(tmp_path / "home"),
        "SD_REST_FORK": f"file://{source}",
        "SD_REST_FORK_COMMIT": "",
    }
    result = setup("fork", env=env)
    assert result.returncode == 0, result.stderr
    repo = tmp_path / "home" / "vendor" / "stable-diffusion"
    assert (repo / "scripts" / "txt2img.py").read_text() == "# two\n"
    assert (
        subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        == second
    )


def test_fork_at_a_commit_the_branch_lacks(tmp_path: Path) -> None:
    source, _, _ = git_fork(tmp_path / "source")
    env = {"SD_REST_DIR": str(tmp_path / "home"), "SD_REST_FORK": str(source)}
    result = setup("fork", env=env)  # the default commit, 3c9f69e, is not in this repository
    assert f"is not on branch {BRANCH}" in error(result)
    assert not (tmp_path / "home" / "vendor" / "stable-diffusion").exists()
    result = setup("fork", env={**env, "SD_REST_FORK_BRANCH": "main"})
    assert "could not clone branch main" in error(result)


def test_fork_from_an_archive_relative_to_the_caller(tmp_path: Path) -> None:
    archive = fork_archive(tmp_path)
    result = setup("fork", env={"SD_REST_DIR": "home", "SD_REST_FORK": archive.name}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    repo = tmp_path / "home" / "vendor" / "stable-diffusion"
    assert sorted(p.name for p in (repo / "scripts").iterdir()) == [
        "img2img.py", "inpaint.py", "txt2img.py",
    ]  # fmt: skip
    assert not list((tmp_path / "home" / "vendor").glob(".*partial*"))


def test_fork_from_a_git_archive_keeps_its_commit_for_the_images(tmp_path: Path) -> None:
    from sd_rest.runs.provenance import read_fork_commit

    source, first, _ = git_fork(tmp_path / "source")
    archive = tmp_path / "fork.tar.gz"
    subprocess.run(
        ["git", "-C", str(source), "archive", "--format=tar.gz", "--prefix=sd-x/",
         "-o", str(archive), first],
        check=True,
    )  # fmt: skip
    result = setup(
        "fork", env={"SD_REST_DIR": str(tmp_path / "home"), "SD_REST_FORK": str(archive)}
    )
    assert result.returncode == 0, result.stderr
    repo = tmp_path / "home" / "vendor" / "stable-diffusion"
    assert (repo / ".source-commit").read_text() == f"{first}\n"
    assert read_fork_commit(repo) == first
    # An archive git did not make (fork_archive) carries none: nothing is written.
    plain = setup(
        "fork",
        env={"SD_REST_DIR": str(tmp_path / "other"), "SD_REST_FORK": str(fork_archive(tmp_path))},
    )
    assert plain.returncode == 0, plain.stderr
    assert not (tmp_path / "other" / "vendor" / "stable-diffusion" / ".source-commit").exists()


def test_fork_source_that_is_not_the_fork(tmp_path: Path) -> None:
    (tmp_path / "other" / "src").mkdir(parents=True)
    subprocess.run(["tar", "-czf", "other.tar.gz", "other"], cwd=tmp_path, check=True)
    env = {"SD_REST_DIR": str(tmp_path / "home"), "SD_REST_FORK": str(tmp_path / "other.tar.gz")}
    assert "is not the Stable Diffusion fork: it has no scripts/txt2img.py" in error(
        setup("fork", env=env)
    )
    assert "neither a git URL, a folder nor a .tar.gz archive" in error(
        setup("fork", env={**env, "SD_REST_FORK": str(tmp_path / "nothing-here")})
    )


# --- venv and verify ----------------------------------------------------------------------


@pytest.fixture
def home_with_fork(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    fork_tree(home / "vendor" / "stable-diffusion")
    return home


def test_venv_with_a_python_that_is_not_there(home_with_fork: Path) -> None:
    env = {"SD_REST_DIR": str(home_with_fork), "SD_REST_PYTHON": "python3.99"}
    message = error(setup("venv", env=env))
    assert message.startswith("setup.sh: error: python3.99 not found")
    assert "brew install python@3.11" in message and "SD_REST_PYTHON" in message


def test_venv_whose_python_is_gone(home_with_fork: Path, tmp_path: Path) -> None:
    venv = tmp_path / "old-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(tmp_path / "uninstalled-python")
    env = {"SD_REST_DIR": str(home_with_fork), "SD_REST_VENV": str(venv)}
    message = error(setup("venv", env=env))
    assert f"the venv {venv} is broken: its python links to {tmp_path / 'uninstalled-python'}" in (
        message
    )
    assert message.endswith(f"delete {venv} and run this again")


def test_verify_reports_what_a_venv_without_torch_lacks(
    home_with_fork: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    venv_without_torch(venv)
    env = {"SD_REST_DIR": str(home_with_fork), "SD_REST_VENV": str(venv)}
    # `verify` needs <fork>/venv, which the venv step links: make the link the way it does.
    (home_with_fork / "vendor" / "stable-diffusion" / "venv").symlink_to(venv)
    result = setup("verify", env=env)
    assert "the fork's venv cannot import what the scripts need" in error(result)
    report = result.stdout
    assert "  FAILED  torch: ModuleNotFoundError: No module named 'torch'" in report
    assert "  - not installed in the fork's venv: torch torchvision numpy" in report
    python = home_with_fork / "vendor" / "stable-diffusion" / "venv" / "bin" / "python"
    constraints = SCRIPTS / "fork-constraints.txt"
    assert f"fix: run scripts/setup.sh again, or: {python} -m pip install -c {constraints}" in (
        report
    )


# --- models --------------------------------------------------------------------------------


def test_models_from_file_urls_with_and_without_a_checksum(tmp_path: Path) -> None:
    source = torch_zip_checkpoint(tmp_path / "source.ckpt")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    home = tmp_path / "home"
    env = {
        "SD_REST_DIR": str(home),
        "SD_REST_TEXT_TO_IMAGE_URL": f"file://{source}",
        "SD_REST_TEXT_TO_IMAGE_SHA256": sha,
        "SD_REST_INPAINT_URL": f"file://{source}",
    }
    result = setup("models", env=env)
    assert result.returncode == 0, result.stderr
    t2i, inpaint = home / "models" / "text-to-image.ckpt", home / "models" / "inpaint-image.ckpt"
    assert t2i.read_bytes() == inpaint.read_bytes() == source.read_bytes()
    assert (home / "models" / "text-to-image.ckpt.sha256").read_text() == (
        f"{sha}  text-to-image.ckpt\n"
    )
    assert not (home / "models" / "inpaint-image.ckpt.sha256").exists()
    assert "SHA-256 matches text-to-image.ckpt.sha256" in check.checkpoint(t2i, "x").detail
    stamps = [t2i.stat().st_mtime_ns, inpaint.stat().st_mtime_ns]
    again = setup("models", env=env)
    assert again.stdout.count("is already there") == 2
    assert [t2i.stat().st_mtime_ns, inpaint.stat().st_mtime_ns] == stamps


def test_models_download_resumes_from_its_part_file(tmp_path: Path) -> None:
    source = torch_zip_checkpoint(tmp_path / "source.ckpt")
    part = tmp_path / "home" / "models" / "text-to-image.ckpt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(source.read_bytes()[: 1024 * 1024])
    env = {
        "SD_REST_DIR": str(tmp_path / "home"),
        "SD_REST_TEXT_TO_IMAGE_URL": f"file://{source}",
        "SD_REST_TEXT_TO_IMAGE_SHA256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "SD_REST_INPAINT_URL": f"file://{source}",
    }
    assert setup("models", env=env).returncode == 0
    assert (part.parent / "text-to-image.ckpt").read_bytes() == source.read_bytes()


def test_models_with_a_wrong_checksum_or_a_web_page(tmp_path: Path) -> None:
    source = torch_zip_checkpoint(tmp_path / "source.ckpt")
    page = tmp_path / "page.html"
    page.write_text("<!DOCTYPE html><html><body>This link has expired</body></html>")
    home = tmp_path / "home"
    env = {
        "SD_REST_DIR": str(home),
        "SD_REST_TEXT_TO_IMAGE_URL": f"file://{source}",
        "SD_REST_TEXT_TO_IMAGE_SHA256": "0" * 64,
    }
    message = error(setup("models", env=env))
    assert "text-to-image.ckpt.part has SHA-256" in message and "delete it" in message
    assert not (home / "models" / "text-to-image.ckpt").exists()
    env["SD_REST_TEXT_TO_IMAGE_URL"] = f"file://{page}"
    (home / "models" / "text-to-image.ckpt.part").unlink()
    message = error(setup("models", env=env))
    assert "did not send a PyTorch checkpoint (it starts with: <!DOCTYPE html>" in message
    env["SD_REST_TEXT_TO_IMAGE_URL"] = f"file://{tmp_path / 'missing.ckpt'}"
    (home / "models" / "text-to-image.ckpt.part").unlink()
    assert "could not download" in error(setup("models", env=env))


# --- certificate ---------------------------------------------------------------------------


def handshake(cert: Path, key: Path, hostname: str) -> None:
    """A real TLS handshake: a client that trusts only `cert`, against a server using it."""
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    client_side = ssl.create_default_context(cafile=str(cert))
    left, right = socket.socketpair()
    with ThreadPoolExecutor(1) as pool, left, right:
        served = pool.submit(server_side.wrap_socket, left, server_side=True)
        client_side.wrap_socket(right, server_hostname=hostname).close()
        served.result(10).close()


def test_cert_with_openssl_when_mkcert_is_absent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = setup("cert", env={"SD_REST_DIR": str(home), "SD_REST_CERT_TOOL": "openssl"})
    assert result.returncode == 0, result.stderr
    assert "Nothing trusts this certificate yet" in result.stdout
    assert "security add-trusted-cert" in result.stdout and "--cacert" in result.stdout
    cert, key = home / "cert.pem", home / "key.pem"
    assert key.stat().st_mode & 0o777 == 0o600 and cert.stat().st_mode & 0o777 == 0o644
    assert check.certificate(cert, key).status == check.OK
    for hostname in ("localhost", "127.0.0.1"):
        handshake(cert, key, hostname)
    before = cert.read_bytes()
    again = setup("cert", env={"SD_REST_DIR": str(home)})
    assert "already there" in again.stdout and cert.read_bytes() == before


def test_cert_with_mkcert_asked_for_but_missing(tmp_path: Path) -> None:
    env = {
        "SD_REST_DIR": str(tmp_path),
        "SD_REST_CERT_TOOL": "mkcert",
        "PATH": "/usr/bin:/bin",  # no mkcert there
    }
    if shutil.which("mkcert", path=env["PATH"]):
        pytest.skip("mkcert is installed in /usr/bin")
    assert "mkcert not found" in error(setup("cert", env=env))
    (tmp_path / "cert.pem").write_text("")
    assert "only one of" in error(setup("cert", env={**env, "SD_REST_CERT_TOOL": "openssl"}))


# --- end to end ----------------------------------------------------------------------------

REAL_PORT = 8888  # the server's default: the test starts it with no flags at all


def lay_kit_files(real_fork: RealFork, repo: Path) -> None:
    """What the kit adds to the fork so that it runs here (tiny configs and models, offline
    model hub), copied from the built kit exactly as its prepare.sh lays them. setup.sh knows
    nothing of these: on a Mac, the real configs and the model hub are used."""
    kit_repo = real_fork.repository
    for config in ("configs/stable-diffusion/v1-inference.yaml", check.CONFIGS[1]):
        shutil.copyfile(kit_repo / config, repo / config)
    for folder in ("models/tiny-clip-text", "CompVis/stable-diffusion-safety-checker"):
        shutil.copytree(kit_repo / folder, repo / folder)


def lay_kit_shim(real_fork: RealFork, venv: Path) -> None:
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    kit_site = next((real_fork.root / "venv" / "lib").glob("python3*/site-packages"))
    for name in ("bfirsh_sd_cpu_compat.py", "bfirsh_sd_cpu_compat.pth"):
        shutil.copyfile(kit_site / name, Path(site) / name)


def snapshot(home: Path, venv: Path) -> dict[str, int]:
    """Modification times of what a second run must not touch."""
    paths = [*home.glob("models/*"), home / "cert.pem", home / "key.pem"]
    paths += [*venv.glob("lib/python3*/site-packages/*.dist-info")]
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.mark.real_fork
def test_setup_from_an_empty_folder_then_serve_every_endpoint(
    real_fork: RealFork, tmp_path: Path
) -> None:
    home, venv = tmp_path / "home", tmp_path / "fork-venv"
    home.mkdir()
    # The kit's start-up shim goes into the venv before setup.sh fills it: on this x86_64 box
    # torch is a local CPU build while PyPI's torchvision is a CUDA build, and without the shim
    # `import torchvision` fails ("operator torchvision::nms does not exist"), which setup.sh's
    # import check rightly reports. On a Mac both come from PyPI and match.
    subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    lay_kit_shim(real_fork, venv)
    kit_models = real_fork.text_to_image_model.parent
    env = {
        "SD_REST_DIR": str(home),
        "SD_REST_FORK": str(Path(os.environ[KIT_ENV]) / "stable-diffusion-3c9f69e.tar.gz"),
        "SD_REST_PYTHON": "python3.11",
        "SD_REST_VENV": str(venv),
        "SD_REST_TEXT_TO_IMAGE_URL": f"file://{kit_models / 'text-to-image.ckpt'}",
        "SD_REST_TEXT_TO_IMAGE_SHA256": checkpoints.sha256_of(kit_models / "text-to-image.ckpt"),
        "SD_REST_INPAINT_URL": f"file://{kit_models / 'inpaint-image.ckpt'}",
        "SD_REST_CERT_TOOL": "openssl",
    }
    first = setup(env=env, timeout=1500)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "venv: installing the pinned packages" in first.stdout
    assert "all 23 imports load" in first.stdout
    repo = home / "vendor" / "stable-diffusion"
    assert (repo / "venv").resolve() == venv.resolve()
    before = snapshot(home, venv)

    second = setup(env=env, timeout=600)
    assert second.returncode == 0, second.stderr
    steps = [line for line in second.stdout.splitlines() if line.startswith("==> ")]
    assert steps[:2] == [
        f"==> fork: {repo} is already there",
        "==> venv: every package already has its pinned version",
    ]
    assert "installing" not in second.stdout and "downloading" not in second.stdout
    assert snapshot(home, venv) == before

    lay_kit_files(real_fork, repo)
    checked = subprocess.run(
        [sys.executable, "-m", "sd_rest", "--check"],
        cwd=home, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    run_jobs_on_a_flagless_server(home, real_fork)
    shutil.rmtree(venv)  # 1.5 GB; kept when the test fails, for a look


def run_jobs_on_a_flagless_server(home: Path, real_fork: RealFork) -> None:
    server = Server(output=home / "output", certs=("", "", str(home / "cert.pem")))
    server.port = REAL_PORT
    server.log_path = home / "server.log"
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen(
            [sys.executable, "-m", "sd_rest"], cwd=home, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        server.wait_ready(timeout=60)
        inputs = real_fork.test_inputs
        posted = [
            server.post_form(
                "text-to-image",
                {"prompt": "a lighthouse", "width": "256", "height": "256", "steps": "4"},
            ),
            server.post_form(
                "image-to-image",
                {"prompt": "the same, at night", "steps": "4"},
                {"image": (inputs / "init.png").read_bytes()},
            ),
            server.post_form(
                "inpaint-image",
                {"steps": "4"},
                {
                    "image": (inputs / "inpaint" / "a.png").read_bytes(),
                    "mask": (inputs / "inpaint" / "a_mask.png").read_bytes(),
                },
            ),
        ]
        for response in posted:
            assert response.status == 303, response.body
            url = response.headers["Location"]
            doc = server.wait_status(url, {"COMPLETE", "FAILED", "CANCELED"}, timeout=600)
            assert doc["status"] == "COMPLETE", (doc, server.log())
            image = server.get(doc["imageUrls"][0])
            assert image.status == 200
            png = home / "last.png"
            png.write_bytes(image.body)
            with Image.open(png) as picture:
                assert picture.size == (256, 256)
        assert "repository vendor/stable-diffusion" in server.log().replace(str(home) + "/", "")
    finally:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
