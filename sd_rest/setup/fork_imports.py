"""Everything the fork's three scripts import, tried in the fork's own interpreter.

This file is run *by the fork's interpreter*, with the environment the server gives the scripts
(cwd = repository, PYTHONPATH = repository, ...), as `python - [--json] [--constraints FILE]`
with this source on stdin: run as a file, its folder would come first on sys.path, and our
`queue.py` would shadow the standard library's for the fork. So: standard library only, and
nothing here may import the rest of sd_rest. `scripts/setup.sh` runs it after installing and
prints its report; `stable-diffusion-rest-api --check` runs it with --json and imports the
pure functions below (`diagnose`) so that both say the same words.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import platform
import sys
import warnings
from typing import Any

# (module, names the fork takes from it, distribution that provides it; None: the fork itself).
# In dependency order, so the first failure is the cause and later ones repeat it. The fork's
# own modules come last: ldm.* (scripts), main (inpaint.py), and the classes the two configs
# instantiate (ddpm, autoencoder, encoders), which the scripts only import when loading a model.
IMPORTS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("torch", ("autocast",), "torch"),
    ("torchvision.utils", ("make_grid",), "torchvision"),
    ("numpy", (), "numpy"),
    ("PIL.Image", (), "pillow"),
    ("cv2", (), "opencv-python-headless"),
    ("omegaconf", ("OmegaConf",), "omegaconf"),
    ("einops", ("rearrange", "repeat"), "einops"),
    ("tqdm", ("tqdm", "trange"), "tqdm"),
    ("imwatermark", ("WatermarkEncoder",), "invisible-watermark"),
    ("pytorch_lightning", ("seed_everything",), "pytorch-lightning"),
    ("pytorch_lightning.utilities.distributed", ("rank_zero_only",), "pytorch-lightning"),
    ("transformers", ("AutoFeatureExtractor", "CLIPTokenizer", "CLIPTextModel"), "transformers"),
    (
        "diffusers.pipelines.stable_diffusion.safety_checker",
        ("StableDiffusionSafetyChecker",),
        "diffusers",
    ),
    ("taming.modules.vqvae.quantize", ("VectorQuantizer2",), "taming-transformers-rom1504"),
    ("clip", (), "clip-anytorch"),
    ("kornia", (), "kornia"),
    ("ldm.util", ("instantiate_from_config",), None),
    ("ldm.models.diffusion.ddim", ("DDIMSampler",), None),
    ("ldm.models.diffusion.plms", ("PLMSSampler",), None),
    ("ldm.models.diffusion.ddpm", ("LatentDiffusion",), None),
    ("ldm.models.autoencoder", ("AutoencoderKL", "VQModelInterface"), None),
    ("ldm.modules.encoders.modules", ("FrozenCLIPEmbedder",), None),
    ("main", ("instantiate_from_config",), None),
)

# Top-level module -> distribution, for a "No module named X" raised deeper down.
DISTRIBUTIONS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "omegaconf": "omegaconf",
    "yaml": "PyYAML",
    "einops": "einops",
    "tqdm": "tqdm",
    "imwatermark": "invisible-watermark",
    "pywt": "PyWavelets",
    "pytorch_lightning": "pytorch-lightning",
    "lightning_fabric": "pytorch-lightning",
    "lightning_utilities": "lightning-utilities",
    "torchmetrics": "torchmetrics",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors",
    "diffusers": "diffusers",
    "taming": "taming-transformers-rom1504",
    "clip": "clip-anytorch",
    "ftfy": "ftfy",
    "regex": "regex",
    "kornia": "kornia",
    "pkg_resources": "setuptools",
    "packaging": "packaging",
}
FORK_MODULES = ("ldm", "main")
# Installed with --no-deps (see scripts/fork-requirements-no-deps.txt for why).
NO_DEPS = ("invisible-watermark",)
# Errors whose message alone says more than "reinstall it".
HINTS = {
    "torchvision::nms": "torchvision was built for another torch build than the one installed "
    "(e.g. PyPI's CUDA torchvision beside a CPU-only torch): install the torchvision release "
    "made for this torch from the same source",
    "pkg_resources": "setuptools 82 and later no longer ship pkg_resources: install the pinned "
    "setuptools",
}
DEFAULT_CONSTRAINTS = "scripts/fork-constraints.txt"


def _version(distribution: str | None) -> str | None:
    if distribution is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return message if len(message) <= 300 else message[:297] + "..."


def try_one(module: str, names: tuple[str, ...], distribution: str | None) -> dict[str, Any]:
    """Import `module` and take `names` from it, as `from module import names` would."""
    record: dict[str, Any] = {"module": module, "distribution": distribution}
    try:
        loaded = importlib.import_module(module)
        for name in names:
            try:
                getattr(loaded, name)
            except AttributeError as exc:
                raise ImportError(f"cannot import name {name!r} from {module!r}") from exc
    except (Exception, SystemExit) as exc:  # a broken package may call sys.exit at import
        record.update(ok=False, error=_first_line(exc))
        # Lazy modules (transformers) re-raise a dependency's failure as their own error:
        # the innermost one names the cause that other imports fail on too.
        inner: BaseException = exc
        while (inner.__cause__ or inner.__context__) is not None:
            inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
        if inner is not exc:
            record["cause"] = _first_line(inner)
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            record["missing"] = exc.name
            cause = DISTRIBUTIONS.get(top, top)
            record["missing_distribution"] = None if top in FORK_MODULES else cause
            record["missing_installed"] = None if top in FORK_MODULES else _version(cause)
        return record
    record.update(ok=True, version=_version(distribution))
    return record


def device() -> str | None:
    """The device the scripts pick (their get_device: cuda, then mps, then cpu)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
    except Exception:
        return "cpu"
    return "cpu"


def probe() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [try_one(*entry) for entry in IMPORTS]
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": sys.platform,
        "machine": platform.machine(),
        "cwd": os.getcwd(),
        "device": device(),
        "results": results,
    }


def diagnose(
    report: dict[str, Any], constraints: str = DEFAULT_CONSTRAINTS
) -> list[tuple[str, str]]:
    """(problem, fix) for each distinct cause of the failures in `report`, in import order.

    A failure repeating an earlier one (same missing module, same error) is folded into it, and
    all distributions that are simply not installed make one problem with one pip command.
    """
    python = report.get("executable") or "python"
    pip = f"{python} -m pip install -c {constraints}"
    causes: dict[str, list[dict[str, Any]]] = {}
    for record in report["results"]:
        if record["ok"]:
            continue
        if record.get("missing") and record.get("missing_distribution") is None:
            key = "fork"
        elif record.get("missing") and record.get("missing_installed") is None:
            key = "not installed"
        elif record.get("missing"):
            key = f"missing:{record['missing']}"
        else:
            key = record.get("cause") or record["error"]
        causes.setdefault(key, []).append(record)
    problems = []
    for key, records in causes.items():
        first = records[0]
        needed_by = "needed by " + ", ".join(r["module"] for r in records)
        if key == "fork":
            names = ", ".join(dict.fromkeys(r["missing"] for r in records))
            problems.append((
                f"the repository {report.get('cwd', '')} has no module {names} ({needed_by})",
                "it is not the bfirsh/stable-diffusion fork, or an incomplete copy: delete it "
                "and run scripts/setup.sh again",
            ))  # fmt: skip
        elif key == "not installed":
            dists = list(dict.fromkeys(r["missing_distribution"] for r in records))
            problems.append((
                f"not installed in the fork's venv: {' '.join(dists)} ({needed_by})",
                f"run scripts/setup.sh again, or: {_pip_commands(pip, dists)}",
            ))  # fmt: skip
        elif first.get("missing"):
            dist = first["missing_distribution"]
            problems.append((
                f"{dist} {first['missing_installed']} has no module {first['missing']} "
                f"({needed_by})",
                "the fork needs the pinned version: run scripts/setup.sh again, or: "
                + _pip_commands(pip, [dist]),
            ))  # fmt: skip
        else:
            modules = ", ".join(r["module"] for r in records)
            hint = next((h for word, h in HINTS.items() if word in key), "")
            dist = first["distribution"]
            fix = (
                f"reinstall {dist}: {pip} --force-reinstall --no-deps {dist}; if it still "
                "fails, delete the venv and run scripts/setup.sh again"
                if dist
                else "delete the venv and run scripts/setup.sh again"
            )
            problems.append((f"{key} (importing {modules})", f"{hint}; {fix}" if hint else fix))
    return problems


def _pip_commands(pip: str, distributions: list[str]) -> str:
    with_deps = [d for d in distributions if d not in NO_DEPS]
    without = [d for d in distributions if d in NO_DEPS]
    commands = [f"{pip} {' '.join(with_deps)}"] if with_deps else []
    commands += [f"{pip} --no-deps {' '.join(without)}"] if without else []
    return " && ".join(commands)


def render(report: dict[str, Any], constraints: str = DEFAULT_CONSTRAINTS) -> str:
    """The human report setup.sh prints."""
    lines = [
        f"imports of the fork's scripts with {report['executable']} "
        f"(Python {report['python']}, {report['platform']} {report['machine']}"
        + (f", device {report['device']})" if report["device"] else ")")
    ]
    for record in report["results"]:
        if record["ok"]:
            version = f" {record['version']}" if record.get("version") else ""
            lines.append(f"  ok      {record['module']}{version}")
        else:
            cause = f" (from {record['cause']})" if record.get("cause") else ""
            lines.append(f"  FAILED  {record['module']}: {record['error']}{cause}")
    problems = diagnose(report, constraints)
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        for problem, fix in problems:
            lines.append(f"  - {problem}")
            lines.append(f"    fix: {fix}")
    else:
        lines.append(f"all {len(report['results'])} imports load")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    constraints = DEFAULT_CONSTRAINTS
    if "--constraints" in argv:
        constraints = argv[argv.index("--constraints") + 1]
    # What the imports print (deprecation warnings, banners) is noise next to the report.
    real = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        report = probe()
    finally:
        sys.stdout, sys.stderr = real
    if "--json" in argv:
        print(json.dumps(report))
    else:
        print(render(report, constraints))
    return 0 if all(r["ok"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
