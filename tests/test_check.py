"""`--check`, item by item: each failure produced for real (missing files, a venv without
torch, a truncated checkpoint, an expired certificate, a full disk, a port in use ...), and
start-up stopping with the same words."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sd_rest.setup import access, check, checkpoints, fork_imports
from sd_rest.setup.certinfo import CertificateError, pem_certificates, private_key_kind, validity

from forkfakes import (
    certificate_pair,
    fork_tree,
    torch_zip_checkpoint,
    truncate,
    venv_without_torch,
)
from helpers import SIMULATOR, free_port
from realfork import RealFork

NOW = datetime.now(timezone.utc)


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sd_rest", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def torchless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return venv_without_torch(tmp_path_factory.mktemp("torchless") / "venv")


@pytest.fixture
def fork(tmp_path: Path) -> Path:
    return fork_tree(tmp_path / "fork")


# --- repository, scripts, interpreter -----------------------------------------------------


def test_repository_missing(tmp_path: Path) -> None:
    result = check.repository(tmp_path / "nope")
    assert result.failed
    assert result.detail == f"Stable Diffusion repository not found at {tmp_path / 'nope'}"
    assert "scripts/setup.sh" in result.fix


def test_scripts_missing_one_then_a_config(fork: Path) -> None:
    assert check.scripts(fork).status == check.OK
    (fork / "scripts" / "inpaint.py").unlink()
    result = check.scripts(fork)
    assert result.failed and "scripts/inpaint.py is missing" in result.detail
    fork_tree(fork)
    (fork / "models" / "ldm" / "inpainting_big" / "config.yaml").unlink()
    result = check.scripts(fork)
    assert result.failed and "models/ldm/inpainting_big/config.yaml is missing" in result.detail


def test_interpreter_missing_explicit_or_default(tmp_path: Path) -> None:
    explicit = check.interpreter(tmp_path / "python", explicit=True)
    default = check.interpreter(tmp_path / "python", explicit=False)
    assert explicit.failed and default.failed
    assert "is missing or not executable" in explicit.detail
    assert explicit.fix == "check --python"
    assert "scripts/setup.sh" in default.fix


def test_interpreter_whose_python_is_gone(tmp_path: Path) -> None:
    """What `brew upgrade` does to a venv: its python links to a Python that is gone."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(tmp_path / "removed-python3.11")
    result = check.interpreter(python, explicit=False)
    assert result.failed
    assert "is a broken link" in result.detail and "removed-python3.11" in result.detail
    assert result.fix == "delete the venv and run scripts/setup.sh again"


def test_interpreter_that_does_not_run(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'dyld: Library not loaded' >&2\nexit 6\n")
    python.chmod(0o755)
    assert check.interpreter(python, explicit=True).status == check.OK  # start-up's share
    result = check.interpreter_runs(python)
    assert result.failed
    assert result.detail.endswith("does not run: dyld: Library not loaded")


def test_interpreter_runs_reports_its_version() -> None:
    result = check.interpreter_runs(Path(sys.executable))
    assert result.status == check.OK
    assert f"(Python {sys.version.split()[0]})" in result.detail


# --- imports -----------------------------------------------------------------------------


def test_imports_in_a_venv_without_torch(torchless: Path, fork: Path) -> None:
    results = check.imports(torchless, fork)
    failed = [r for r in results if r.failed]
    assert failed, results
    first = failed[0]
    assert first.item == "imports"
    assert first.detail.startswith("not installed in the fork's venv: torch torchvision numpy")
    # One pip command for all of them, and invisible-watermark alone without its dependencies.
    assert f"{torchless} -m pip install -c " in first.fix
    assert first.fix.endswith("--no-deps invisible-watermark")
    # The fake fork has ldm/ but not ldm.util: named as the repository's problem.
    assert any("has no module ldm.util" in r.detail for r in failed)
    assert results[-1].item == "device" and results[-1].status == check.SKIP


def test_imports_run_with_the_servers_script_environment(tmp_path: Path, fork: Path) -> None:
    """cwd = repository and PYTHONPATH = repository: `main` and `ldm` come from the fork."""
    python = tmp_path / "python"
    # A stand-in interpreter that records where it runs, then fails like a broken one.
    python.write_text(
        f"#!/bin/sh\npwd > {tmp_path}/cwd\necho $PYTHONPATH > {tmp_path}/path\n"
        f"echo $PYTORCH_ENABLE_MPS_FALLBACK > {tmp_path}/mps\nexit 1\n"
    )
    python.chmod(0o755)
    [result] = check.imports(python, fork)
    assert result.failed and "could not run the import check" in result.detail
    assert (tmp_path / "cwd").read_text().strip() == str(fork)
    assert (tmp_path / "path").read_text().strip() == str(fork.absolute())
    assert (tmp_path / "mps").read_text().strip() == "1"


def _record(module: str, dist: str | None, **fields: object) -> dict[str, object]:
    return {"module": module, "distribution": dist, "ok": False, **fields}


def test_diagnose_folds_repeats_and_names_each_cause() -> None:
    report = {
        "executable": "/v/bin/python",
        "cwd": "/repo",
        "results": [
            {"module": "torch", "distribution": "torch", "ok": True, "version": "2.13.0"},
            _record("torchvision.utils", "torchvision", error="RuntimeError: operator x"),
            _record(
                "transformers",
                "transformers",
                error="ModuleNotFoundError: Could not import module 'CLIPTextModel'",
                cause="RuntimeError: operator x",
            ),
            _record(
                "cv2",
                "opencv-python-headless",
                error="ModuleNotFoundError: No module named 'cv2'",
                missing="cv2",
                missing_distribution="opencv-python-headless",
                missing_installed=None,
            ),
            _record(
                "pytorch_lightning.utilities.distributed",
                "pytorch-lightning",
                error="ModuleNotFoundError: No module named 'pytorch_lightning.utilities.d'",
                missing="pytorch_lightning.utilities.distributed",
                missing_distribution="pytorch-lightning",
                missing_installed="2.6.6",
            ),
            _record(
                "clip",
                "clip-anytorch",
                error="ModuleNotFoundError: No module named 'pkg_resources'",
                missing="pkg_resources",
                missing_distribution="setuptools",
                missing_installed=None,
            ),
        ],
    }
    problems = fork_imports.diagnose(report, "c.txt")
    assert [p for p, _ in problems] == [
        "RuntimeError: operator x (importing torchvision.utils, transformers)",
        "not installed in the fork's venv: opencv-python-headless setuptools (needed by cv2, clip)",
        "pytorch-lightning 2.6.6 has no module pytorch_lightning.utilities.distributed "
        "(needed by pytorch_lightning.utilities.distributed)",
    ]
    fixes = [f for _, f in problems]
    assert "--force-reinstall --no-deps torchvision" in fixes[0]
    assert fixes[1].endswith(
        "/v/bin/python -m pip install -c c.txt opencv-python-headless setuptools"
    )
    assert "pinned version" in fixes[2]


def test_device_warns_about_the_cpu() -> None:
    assert check.device("mps", "darwin").status == check.OK
    assert check.device("cuda", "linux").status == check.OK
    mac = check.device("cpu", "darwin")
    assert mac.status == check.WARN and "MPS" in mac.detail and "arm64" in mac.fix
    assert check.device("cpu", "linux").status == check.WARN
    assert check.device(None, "linux").status == check.SKIP


# --- checkpoints --------------------------------------------------------------------------


def test_checkpoint_missing(tmp_path: Path) -> None:
    result = check.checkpoint(tmp_path / "t.ckpt", "text-to-image")
    assert result.failed
    assert result.detail == f"text-to-image model checkpoint not found at {tmp_path / 't.ckpt'}"
    assert "--text-to-image-model" in result.fix


def test_checkpoint_whole_torch_zip(tmp_path: Path) -> None:
    path = torch_zip_checkpoint(tmp_path / "t.ckpt")
    result = check.checkpoint(path, "text-to-image")
    # Whole and loadable, but far smaller than a real model: a warning, not a failure.
    assert result.status == check.WARN
    assert "torch zip format" in result.detail and "checksum not known" in result.detail


def test_checkpoint_truncated(tmp_path: Path) -> None:
    path = truncate(torch_zip_checkpoint(tmp_path / "t.ckpt"))
    result = check.checkpoint(path, "inpaint-image", verify_sha256=False)
    assert result.failed
    assert "is truncated: its zip has no end-of-central-directory record" in result.detail
    assert "delete it and run scripts/setup.sh models" in result.fix


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "neither a zip nor a pickle"),
        (b"\n<!DOCTYPE html><html>Sign in to continue</html>" * 30_000, "it is a web page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "Git LFS pointer"),
        ((20).to_bytes(8, "little") + b'{"__metadata__":{}}' + b"\0" * 2**21, "safetensors"),
        (b"GGUF" + b"\0" * 2**21, "neither a zip nor a pickle"),
    ],
)
def test_checkpoint_that_is_not_one(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "t.ckpt"
    path.write_bytes(content)
    result = check.checkpoint(path, "text-to-image")
    assert result.failed and words in result.detail, result.detail


def test_checkpoint_zip_that_is_not_torch(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "t.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", os.urandom(2**21))
    result = check.checkpoint(path, "text-to-image")
    assert result.failed and "a zip without data.pkl" in result.detail


def test_checkpoint_legacy_pickle(tmp_path: Path) -> None:
    path = tmp_path / "t.ckpt"
    path.write_bytes(b"\x80\x02" + os.urandom(2**21))
    result = check.checkpoint(path, "text-to-image")
    assert result.status == check.WARN and "legacy torch pickle format" in result.detail


def test_checkpoint_checksum_from_its_sidecar(tmp_path: Path) -> None:
    path = torch_zip_checkpoint(tmp_path / "t.ckpt")
    sidecar = tmp_path / "t.ckpt.sha256"
    sidecar.write_text(f"{checkpoints.sha256_of(path)}  t.ckpt\n")
    assert "SHA-256 matches t.ckpt.sha256" in check.checkpoint(path, "text-to-image").detail
    # One byte changed in the middle: still a whole zip, but not the file that was checked.
    with path.open("r+b") as file:
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    result = check.checkpoint(path, "text-to-image")
    assert result.failed and "does not match the SHA-256 of t.ckpt.sha256" in result.detail
    # Start-up does not hash gigabytes.
    assert not check.checkpoint(path, "text-to-image", verify_sha256=False).failed


def test_published_checksum_by_size(tmp_path: Path) -> None:
    assert checkpoints.expected_sha256(tmp_path / "x.ckpt", 4_265_380_512) == (
        "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556",
        "the published sd-v1-4.ckpt",
    )
    assert checkpoints.expected_sha256(tmp_path / "x.ckpt", 123) is None


# --- certificate --------------------------------------------------------------------------


def test_certificate_valid(tmp_path: Path) -> None:
    cert, key = certificate_pair(tmp_path)
    result = check.certificate(cert, key)
    assert result.status == check.OK and "valid until" in result.detail


def test_certificate_or_key_missing(tmp_path: Path) -> None:
    cert, key = certificate_pair(tmp_path)
    result = check.certificate(tmp_path / "none.pem", key)
    assert result.failed and result.detail == f"SSL certificate {tmp_path / 'none.pem'} not found"
    assert "mkcert -cert-file cert.pem -key-file key.pem 0.0.0.0" in result.fix
    result = check.certificate(cert, tmp_path / "none.pem")
    assert result.failed and "SSL certificate key" in result.detail


def test_certificate_expired(tmp_path: Path) -> None:
    cert, key = certificate_pair(
        tmp_path, not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=2)
    )
    result = check.certificate(cert, key)
    expected = (NOW - timedelta(days=2)).strftime("%Y-%m-%d")
    assert result.failed and result.detail == f"the certificate {cert} expired on {expected}"
    assert "scripts/setup.sh cert" in result.fix


def test_certificate_not_yet_valid(tmp_path: Path) -> None:
    cert, key = certificate_pair(
        tmp_path, not_before=NOW + timedelta(days=3), not_after=NOW + timedelta(days=300)
    )
    result = check.certificate(cert, key)
    assert result.failed and "is not valid before" in result.detail
    assert "clock" in result.fix


def test_certificate_expiring_soon_warns(tmp_path: Path) -> None:
    cert, key = certificate_pair(tmp_path, not_after=NOW + timedelta(days=3))
    assert check.certificate(cert, key).status == check.WARN


def test_certificate_with_another_pairs_key(tmp_path: Path) -> None:
    cert, _ = certificate_pair(tmp_path, name="a")
    _, other_key = certificate_pair(tmp_path, name="b")
    result = check.certificate(cert, other_key)
    assert result.failed and result.detail.endswith("the key is not this certificate's")


def test_certificate_files_that_are_not_pem(tmp_path: Path) -> None:
    cert, key = certificate_pair(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    assert "holds no PEM certificate" in check.certificate(junk, key).detail
    assert "holds no PEM private key" in check.certificate(cert, junk).detail
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nMIIB@@@\n-----END CERTIFICATE-----\n")
    assert "not valid base64" in check.certificate(broken, key).detail


def test_certificate_key_with_a_passphrase(tmp_path: Path) -> None:
    cert, _ = certificate_pair(tmp_path)
    key = tmp_path / "locked.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-aes-256-cbc", "-pass", "pass:secret", "-out", str(key)],
        check=True, capture_output=True,
    )  # fmt: skip
    result = check.certificate(cert, key)
    assert result.failed and "protected by a passphrase" in result.detail


def test_openssl_self_signed_days_trick(tmp_path: Path) -> None:
    """A certificate from the openssl command (not trustme), read by our own DER reader."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    not_before, not_after = validity(pem_certificates(cert.read_bytes())[0])
    assert timedelta(days=2) - timedelta(minutes=5) < not_after - not_before <= timedelta(days=2)
    assert check.certificate(cert, key).status == check.WARN  # two days left
    assert check.certificate(cert, key, now=NOW + timedelta(days=3)).failed


def test_certificate_key_that_is_a_loop_of_links(tmp_path: Path) -> None:
    cert, _ = certificate_pair(tmp_path)
    key = tmp_path / "loop.pem"
    key.symlink_to(tmp_path / "loop2.pem")
    (tmp_path / "loop2.pem").symlink_to(key)
    expected = (
        f"SSL certificate key {key} is out of reach: its symbolic links form a loop; "
        f"fix: correct or remove the link {key}, or pass --key"
    )
    assert check.certificate(cert, key).message() == expected


def test_der_reader_refuses_what_is_not_a_certificate() -> None:
    with pytest.raises(CertificateError):
        validity(b"\x30\x82\xff\xff")  # a length past the end
    with pytest.raises(CertificateError):
        validity(b"\x04\x02ab")  # an OCTET STRING, not a SEQUENCE
    assert private_key_kind(b"-----BEGIN PRIVATE KEY-----\n") == "PRIVATE KEY"
    assert private_key_kind(b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n") == (
        "ENCRYPTED RSA PRIVATE KEY"
    )
    assert private_key_kind(b"nothing") is None


# --- output folder, free space, port ------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A mount point for a tiny tmpfs, when this user may mount one (root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", str(point)], capture_output=True, check=False)


def _mount(point: Path, options: str) -> None:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def test_output_folder_writable_or_to_be_made(tmp_path: Path) -> None:
    assert check.output_folder(tmp_path, create=False).status == check.OK
    later = check.output_folder(tmp_path / "a" / "b", create=False)
    assert later.status == check.OK and "made at start" in later.detail
    assert not (tmp_path / "a").exists()  # --check leaves no trace
    assert check.output_folder(tmp_path / "c", create=True).status == check.OK
    assert (tmp_path / "c").is_dir()


def test_output_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("")
    result = check.output_folder(tmp_path / "out", create=False)
    assert result.failed and "is not a folder" in result.detail
    assert check.output_folder(tmp_path / "out", create=True).failed


def test_output_folder_under_a_file(tmp_path: Path) -> None:
    """The same words for a start (which makes the folder) and for --check."""
    file = tmp_path / "cert.pem"
    file.write_text("")
    output = file / "output"
    expected = (
        f"the output folder {output} is out of reach: {file} is a file, not a folder; "
        "fix: pass --output"
    )
    assert check.output_folder(output, create=True).message() == expected
    assert check.output_folder(output, create=False).message() == expected


def test_output_folder_not_writable(tmp_path: Path, tmpfs: Path) -> None:
    _mount(tmpfs, "ro,size=1m")
    result = check.output_folder(tmpfs, create=False)
    assert result.failed and "is not writable (Read-only file system)" in result.detail
    result = check.output_folder(tmpfs / "output", create=False)
    assert result.failed and "cannot be created" in result.detail


def test_output_problem_prescribes_chown_only_for_permissions(tmp_path: Path) -> None:
    """A disk's error is no other user's doing: no chown for it."""
    output, job = tmp_path / "output", tmp_path / "output" / "text-to-image" / "a"
    denied = access.output_problem(output, "recover", OSError(errno.EACCES, "Denied", str(job)))
    assert f"fix: {access.owner_fix(output)} (made by another user?), or pass --output" in denied
    failing = access.output_problem(output, "recover", OSError(errno.EIO, "I/O error", str(job)))
    assert failing == (
        f"cannot recover in the output folder {output}: {job}: I/O error; "
        "fix: check the disk, or pass --output"
    )


def test_job_index_put_right_by_the_server_is_a_warning(tmp_path: Path) -> None:
    """Anything but a plain file in the index's place (a folder, a link to a usable file, a
    loop of links) is moved to the quarantine by the server, which never follows a link there:
    a warning when this user may move it."""
    index = tmp_path / ".index.sqlite3"
    assert check.job_index(tmp_path).message() == f"{index} (made at start)"
    index.mkdir()
    moved = (
        f"{index} is not a file: the server moves it to the quarantine and makes the index "
        "again from the job folders"
    )
    warning = check.Result("job index", check.WARN, moved)
    assert check.job_index(tmp_path) == warning
    index.rmdir()
    usable = tmp_path / "elsewhere.sqlite3"
    usable.write_bytes(b"")
    index.symlink_to(usable)
    assert check.job_index(tmp_path) == warning
    index.unlink()
    index.symlink_to(tmp_path / ".index.sqlite3-wal")
    Path(f"{index}-wal").symlink_to(index)
    assert check.job_index(tmp_path) == warning


def test_free_space_on_a_full_disk(tmpfs: Path) -> None:
    _mount(tmpfs, "size=1m")
    result = check.free_space(tmpfs / "output")
    assert result.failed
    assert result.detail.startswith("only 1.0 MiB free") and "(1.0 GiB needed)" in result.detail
    assert check.free_space(tmpfs, minimum=1024).status == check.OK


def test_free_space_minimum_is_a_parameter(tmp_path: Path) -> None:
    assert check.free_space(tmp_path).status == check.OK
    assert check.free_space(tmp_path, minimum=2**62).failed


def test_port_in_use_and_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        result = check.port("127.0.0.1", busy)
    assert result.failed
    assert result.detail == f"cannot listen on 127.0.0.1:{busy}: the port is in use " + (
        "(is the server already running?)"
    )
    assert check.port("127.0.0.1", free_port()).status == check.OK


def test_port_on_an_address_that_is_not_here() -> None:
    # TEST-NET-1: never an address of this machine (bound only: nothing is sent).
    result = check.port("192.0.2.1", 8888)
    assert result.failed and "cannot listen on 192.0.2.1:8888" in result.detail


# --- the command ---------------------------------------------------------------------------


def test_check_command_prints_every_item_and_fails(tmp_path: Path) -> None:
    """An empty folder: one line per item, each failure with its fix, exit status 1."""
    port = free_port()
    result = cli("--check", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    items = [line[6:27].strip() for line in lines[:-1]]
    assert items == [
        "repository", "scripts", "interpreter", "imports", "text-to-image model",
        "inpaint-image model", "certificate", "output folder", "job index", "free space",
        "port",
    ]  # fmt: skip
    for line in lines[:-1]:
        assert line.startswith(("FAIL", "skip", "  ok", "warn")), line
        if line.startswith("FAIL"):
            assert "; fix: " in line, line
    assert lines[-1] == "not ready: 5 items failed"
    assert not (tmp_path / "output").exists()


def test_check_command_with_a_torchless_venv_and_an_expired_certificate(
    tmp_path: Path, torchless: Path, fork: Path
) -> None:
    cert, key = certificate_pair(
        tmp_path, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )
    model = torch_zip_checkpoint(tmp_path / "model.ckpt")
    # Relative paths, and the default interpreter <repository>/venv/bin/python, as setup.sh
    # leaves them: the import check runs inside the repository all the same.
    (fork / "venv").symlink_to(torchless.parent.parent)
    args = [
        "--check", "--repository", fork.name,
        "--text-to-image-model", str(model), "--inpaint-image-model", str(model),
        "--cert", str(cert), "--key", str(key), "--host", "127.0.0.1", "--port", str(free_port()),
    ]  # fmt: skip
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    out = result.stdout
    assert "  ok  repository" in out and "  ok  interpreter" in out
    assert "FAIL  imports               not installed in the fork's venv: torch" in out
    assert f"FAIL  certificate           the certificate {cert} expired on" in out
    assert "warn  text-to-image model" in out


def test_check_refuses_demo(tmp_path: Path) -> None:
    result = cli("--check", "--demo", cwd=tmp_path)
    assert result.returncode != 0 and "leave out --demo" in result.stderr


def test_start_up_fails_with_the_words_of_check(tmp_path: Path, fork: Path) -> None:
    """The same sentence from start-up (one error line) and from --check (its item's line)."""
    cert, key = certificate_pair(
        tmp_path, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )
    common = ["--repository", str(SIMULATOR), "--python", sys.executable, "--cert", str(cert)]
    common += ["--key", str(key), "--port", str(free_port()), "--host", "127.0.0.1"]
    start = cli(*common, cwd=tmp_path, timeout=30)
    checked = cli("--check", *common, cwd=tmp_path)
    message = check.certificate(cert, key).message()
    assert start.returncode != 0
    assert start.stderr.strip() == f"stable-diffusion-rest-api: error: {message}"
    assert f"FAIL  certificate           {message}" in checked.stdout.splitlines()


def test_demo_start_checks_the_output_folder_once(tmp_path: Path) -> None:
    """Demo mode checks it before making its certificate there, and not again."""
    output = tmp_path / "output"
    (output / ".index.sqlite3").mkdir(parents=True)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["--demo", "--no-warm-start", "--output", str(output)]
        start = cli(*args, "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path, timeout=60)
    assert start.returncode != 0
    assert start.stderr.count("is not a file: the server moves it to the quarantine") == 1
    last = start.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stable-diffusion-rest-api: error: cannot listen on 127.0.0.1:{port}")


def test_recovery_failure_that_is_no_permission_gives_its_own_fix(tmp_path: Path) -> None:
    output = tmp_path / "output"
    queue = output / ".queue"
    output.mkdir()
    queue.symlink_to(output / "loop")
    (output / "loop").symlink_to(queue)
    args = ["--demo", "--no-warm-start", "--output", str(output), "--host", "127.0.0.1"]
    start = cli(*args, "--port", str(free_port()), cwd=tmp_path, timeout=60)
    assert start.returncode != 0
    assert "Traceback" not in start.stderr
    assert start.stderr.strip().splitlines()[-1] == (
        "stable-diffusion-rest-api: error: cannot recover the unfinished jobs in the output "
        f"folder {output}: {queue}: its symbolic links form a loop; "
        f"fix: correct or remove the link {queue}, or pass --output"
    )


def test_start_up_warns_about_a_truncated_checkpoint(make_server, tmp_path: Path) -> None:
    model = truncate(torch_zip_checkpoint(tmp_path / "t.ckpt"))
    args = ["--repository", str(SIMULATOR), "--python", sys.executable]
    server = make_server(args=[*args, "--text-to-image-model", str(model)], demo=False)
    assert "is truncated" in server.log()
    assert "/text-to-image, /image-to-image will fail until it is fixed" in server.log()


# --- the real fork -------------------------------------------------------------------------


@pytest.mark.real_fork
def test_check_passes_on_the_real_fork(real_fork: RealFork, tmp_path: Path) -> None:
    cert, key = certificate_pair(tmp_path)
    args = [*real_fork.server_args(), "--cert", str(cert), "--key", str(key)]
    args += ["--host", "127.0.0.1", "--port", str(free_port()), "--output", str(tmp_path / "o")]
    result = cli("--check", *args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  ok  imports               all 23 load (torch 2.13.0" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("ready: ")


@pytest.mark.real_fork
def test_check_finds_a_truncated_real_checkpoint(real_fork: RealFork, tmp_path: Path) -> None:
    copy = tmp_path / "text-to-image.ckpt"
    shutil.copyfile(real_fork.text_to_image_model, copy)
    assert not check.checkpoint(copy, "text-to-image").failed
    truncate(copy, 0.9)
    result = check.checkpoint(copy, "text-to-image")
    assert result.failed and "is truncated" in result.detail


def test_the_import_check_names_each_kind_of_problem_at_once() -> None:
    # The test venv's own Python on the simulator: a stand-in torch and transformers that lack
    # what the fork uses, packages the fork needs that are not installed, and a repository
    # that is not the fork. Each is a problem of its own, each with its fix.
    from sd_rest.setup import check as checks
    from sd_rest.setup.demo import SIMULATOR

    results = checks.imports(Path(sys.executable), SIMULATOR, timeout=300)
    failed = [r for r in results if r.failed]
    details = [r.detail for r in failed]
    assert any("module 'torch' has no attribute" in d for d in details), details
    assert any(d.startswith("not installed in the fork's venv: torchvision") for d in details)
    assert any("has no module ldm.models.diffusion.ddim" in d for d in details), details
    assert all(r.fix for r in failed)
    assert results[-1].item == "device" and not results[-1].failed
