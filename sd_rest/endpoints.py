"""The three endpoints, each with all its behaviour: the fields it takes and their defaults,
how its uploads become the files its script reads, its script's flags, the folders a run of
it needs, and where its images appear. Adding an endpoint is adding a class here."""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sd_rest.fields import Params
from sd_rest.images.pngfile import png_size
from sd_rest.images.uploads import prepare_init_image, prepare_inpaint
from sd_rest.scripts import RunFolders, RunPlan
from sd_rest.settings import Model

TEXT_TO_IMAGE: Final = "text-to-image"
IMAGE_TO_IMAGE: Final = "image-to-image"
INPAINT_IMAGE: Final = "inpaint-image"

Default = int | float | str | None  # None: required, no default


@dataclass(frozen=True)
class Endpoint(ABC):
    name: str
    script: str  # path inside the Stable Diffusion repository
    model: Model  # which checkpoint it runs on
    defaults: Mapping[str, Default]  # its fields, in order, with the original's defaults
    files: tuple[str, ...] = ()  # required uploads
    # Names of other endpoints' fields a client may send here by mistake, and why not here.
    refused: Mapping[str, str] = field(default_factory=dict)
    # Fields added after jobs were stored: left out of the parameters at their default, so
    # that a request without them keeps the job id it always had (the id hashes them).
    later: frozenset[str] = frozenset()

    def total_images(self, params: Params) -> int:
        """iterations × batchSize; an endpoint without them makes one image."""
        return int(params.get("iterations", 1)) * int(params.get("batchSize", 1))

    def takes(self, name: str) -> bool:
        return name in self.defaults or name in self.files

    # --- uploads ----------------------------------------------------------------------

    def prepare_inputs(self, uploads: Mapping[str, bytes]) -> dict[str, bytes]:
        """The files the script reads, made from the client's uploads (pure; may raise a
        400 ApiError). No uploads, no inputs."""
        return {}

    def input_names(self) -> dict[str, str]:
        """Upload field -> file name in the job's `inputs/` folder."""
        return {name: f"{name}.png" for name in self.files}

    def image_size(self, params: Params, inputs: Mapping[str, bytes]) -> tuple[int, int]:
        """(width, height) of the images a job makes."""
        if "image" in inputs:
            return png_size(inputs["image"])
        return int(params["width"]), int(params["height"])

    # --- a run ------------------------------------------------------------------------

    @abstractmethod
    def make_run_folders(self, root: Path, repository: Path, checkpoint: Path) -> RunFolders:
        """Lay out a fresh run's folders under the empty `root` (I/O)."""

    @abstractmethod
    def arguments(
        self, params: Params, plan: RunPlan, folders: RunFolders, checkpoint: Path, inputs: Path
    ) -> list[str]:
        """The script's flags. Every value is passed explicitly (the scripts' defaults differ
        from the API's) and as `--flag=value`, so a value starting with `-` cannot be read as
        a flag. `inputs` is the job's folder of input files."""

    @abstractmethod
    def outputs(self, folders: RunFolders) -> list[Path]:
        """The image files the run has created so far, in the order they were made (I/O)."""

    def start_seed(self, plan: RunPlan) -> int | None:
        """A seed torch must get when the interpreter starts, for a script without a seed
        flag; None when the flags carry it."""
        return None


_SAMPLE = re.compile(r"[0-9]{5}\.png")


@dataclass(frozen=True)
class SamplingEndpoint(Endpoint):
    """txt2img.py and img2img.py: the same sampling flags and output layout."""

    def make_run_folders(self, root: Path, repository: Path, checkpoint: Path) -> RunFolders:
        images = root / "out" / "samples"
        images.mkdir(parents=True)
        # The scripts open their configs by relative path: they run in the repository.
        return RunFolders(root=root, outdir=root / "out", images=images, cwd=repository)

    def arguments(
        self, params: Params, plan: RunPlan, folders: RunFolders, checkpoint: Path, inputs: Path
    ) -> list[str]:
        return [
            f"--prompt={params['prompt']}",
            f"--outdir={folders.outdir}",
            "--skip_grid",
            f"--ddim_steps={params['steps']}",
            f"--ddim_eta={float(params['eta'])!r}",
            f"--n_iter={plan.n_iter}",
            f"--n_samples={plan.n_samples}",
            f"--scale={float(params['guidanceScale'])!r}",
            f"--seed={plan.seed}",
            f"--ckpt={checkpoint}",
            *self.own_arguments(params, inputs),
        ]

    @abstractmethod
    def own_arguments(self, params: Params, inputs: Path) -> list[str]: ...

    def outputs(self, folders: RunFolders) -> list[Path]:
        # <outdir>/samples/NNNNN.png, numbered from the count of files already there.
        try:
            names = os.listdir(folders.images)
        except FileNotFoundError:
            return []
        return [folders.images / name for name in sorted(names) if _SAMPLE.fullmatch(name)]


_SAMPLING_DEFAULTS: Final[dict[str, Default]] = {
    "prompt": None,
    "iterations": 1,
    "batchSize": 1,
    "steps": 8,
    "seed": 42,
}
_SIZE_FROM_IMAGE: Final = "the size comes from the uploaded image"


@dataclass(frozen=True)
class TextToImage(SamplingEndpoint):
    def own_arguments(self, params: Params, inputs: Path) -> list[str]:
        plms = ["--plms"] if params.get("plms") else []
        return [f"--H={params['height']}", f"--W={params['width']}", *plms]


@dataclass(frozen=True)
class ImageToImage(SamplingEndpoint):
    def prepare_inputs(self, uploads: Mapping[str, bytes]) -> dict[str, bytes]:
        return {"image": prepare_init_image(uploads["image"])}

    def own_arguments(self, params: Params, inputs: Path) -> list[str]:
        image = inputs / self.input_names()["image"]
        return [f"--init-img={image}", f"--strength={float(params['strength'])!r}"]


INPAINT_CONFIG: Final = Path("models/ldm/inpainting_big/config.yaml")
INPAINT_CHECKPOINT: Final = Path("models/ldm/inpainting_big/last.ckpt")
INPAINT_INPUT_NAME: Final = "image"  # inputs/image.png + inputs/image_mask.png -> image.png


@dataclass(frozen=True)
class InpaintImage(Endpoint):
    """inpaint.py: no prompt, no seed flag, one image, config and checkpoint by relative
    path from its working directory, inputs paired by name in a folder."""

    def prepare_inputs(self, uploads: Mapping[str, bytes]) -> dict[str, bytes]:
        image, mask = prepare_inpaint(uploads["image"], uploads["mask"])
        return {"image": image, "mask": mask}

    def input_names(self) -> dict[str, str]:
        # inpaint.py pairs X_mask.png with X.png in its input folder.
        return {"image": f"{INPAINT_INPUT_NAME}.png", "mask": f"{INPAINT_INPUT_NAME}_mask.png"}

    def make_run_folders(self, root: Path, repository: Path, checkpoint: Path) -> RunFolders:
        # A working folder that links to the repository's config and to the chosen
        # checkpoint, so the user's repository is never touched.
        cwd = root / "cwd"
        (cwd / INPAINT_CONFIG.parent).mkdir(parents=True)
        (cwd / INPAINT_CONFIG).symlink_to(repository / INPAINT_CONFIG)
        (cwd / INPAINT_CHECKPOINT).symlink_to(checkpoint)
        outdir = root / "out"
        outdir.mkdir()
        return RunFolders(root=root, outdir=outdir, images=outdir, cwd=cwd)

    def arguments(
        self, params: Params, plan: RunPlan, folders: RunFolders, checkpoint: Path, inputs: Path
    ) -> list[str]:
        return [f"--indir={inputs}", f"--outdir={folders.outdir}", f"--steps={params['steps']}"]

    def outputs(self, folders: RunFolders) -> list[Path]:
        made = folders.images / f"{INPAINT_INPUT_NAME}.png"
        return [made] if made.exists() else []

    def start_seed(self, plan: RunPlan) -> int | None:
        return plan.seed


ENDPOINTS: Final[dict[str, Endpoint]] = {
    endpoint.name: endpoint
    for endpoint in (
        TextToImage(
            name=TEXT_TO_IMAGE,
            script="scripts/txt2img.py",
            model=Model.TEXT_TO_IMAGE,
            defaults={
                **_SAMPLING_DEFAULTS,
                "width": 512,
                "height": 512,
                "guidanceScale": 7.5,
                "eta": 0.0,
                "plms": 0,
            },
            later=frozenset({"plms"}),
        ),
        ImageToImage(
            name=IMAGE_TO_IMAGE,
            script="scripts/img2img.py",
            model=Model.TEXT_TO_IMAGE,
            defaults={
                **_SAMPLING_DEFAULTS,
                "steps": 24,
                "guidanceScale": 7.5,
                "eta": 0.0,
                "strength": 0.75,
            },
            files=("image",),
            refused={"width": _SIZE_FROM_IMAGE, "height": _SIZE_FROM_IMAGE},
        ),
        InpaintImage(
            name=INPAINT_IMAGE,
            script="scripts/inpaint.py",
            model=Model.INPAINT_IMAGE,
            defaults={"steps": 32, "seed": 42},
            files=("image", "mask"),
            refused={
                "prompt": "inpaint-image takes no prompt: it fills the mask from the image",
                "width": _SIZE_FROM_IMAGE,
                "height": _SIZE_FROM_IMAGE,
            },
        ),
    )
}
