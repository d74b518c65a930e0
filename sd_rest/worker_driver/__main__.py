"""Start the resident worker: ``<fork venv python> <path of this folder>`` (see __init__.py).

The folder is loaded as a package under a private name, so that its modules can neither shadow
nor be shadowed by the scripts' own (a script's ``import channel`` must not find ours), and so
that it runs the same whether or not ``sd_rest`` is importable by the fork's interpreter (it
is not: the fork's venv does not have sd-rest installed).
"""

import importlib
import importlib.util
import os
import sys

PRIVATE_NAME = "_sd_rest_worker_driver"


def _load_package_privately(folder: str) -> None:
    spec = importlib.util.spec_from_file_location(
        PRIVATE_NAME, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the worker driver from {folder}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[PRIVATE_NAME] = package
    spec.loader.exec_module(package)


def _run() -> int:
    folder = os.path.dirname(os.path.abspath(__file__))
    # `python <folder>` put the folder first on sys.path; a script run by hand has its own
    # folder there instead (each run puts it back), and nothing may be imported from ours.
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == folder:
        del sys.path[0]
    _load_package_privately(folder)
    worker = importlib.import_module(PRIVATE_NAME + ".worker")
    return worker.main()


if __name__ == "__main__":
    sys.exit(_run())
