"""Loader of the native CPU kernel: registers ``torch.ops.atesd_native.linear_kl_fwd/bwd`` (kernels/csrc).

The shared library is ``_atesd_native.so``, installed into this package by the build backend (CMakeLists.txt) or
left in a CMake build tree under ``build/``; ``ATESD_NATIVE_LIBRARY=<path>`` names one explicitly (e.g. a sanitizer
build, docs/native.md). Importing this module raises ImportError when it is not built or does not load; ``_ops``
then warns, says why in ``describe_backend``, and uses the tiled torch path. ``LIBRARY`` is the path that was loaded.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_NAME = "_atesd_native"


def _candidates() -> list[str]:
    if os.environ.get("ATESD_NATIVE_LIBRARY"):
        return [os.environ["ATESD_NATIVE_LIBRARY"]]
    found = []
    spec = importlib.util.find_spec(f"{__package__}.{_NAME}")  # installed (also through an editable redirect)
    if spec is not None and spec.origin:
        found.append(spec.origin)
    here = os.path.dirname(os.path.abspath(__file__))
    found += sorted(glob.glob(os.path.join(here, f"{_NAME}*.so")))
    # build trees of `pip install` (build/<wheel tag>) and of a manual `cmake -B build/<dir>`, newest first
    trees = glob.glob(os.path.join(os.path.dirname(here), "build", "*", f"{_NAME}*.so"))
    found += sorted(trees, key=os.path.getmtime, reverse=True)
    return found


def _load() -> str:
    if hasattr(torch.ops, "atesd_native") and hasattr(torch.ops.atesd_native, "linear_kl_fwd"):
        return "(already registered)"
    for path in _candidates():
        if os.path.isfile(path):
            try:
                torch.ops.load_library(path)
            except (OSError, RuntimeError) as e:  # stale or foreign build: the torch path serves, with a warning
                raise ImportError(f"native CPU kernel at {path} does not load ({e}); rebuild with `make setup`") from e
            return path
    if os.environ.get("ATESD_NATIVE_LIBRARY"):
        raise ImportError(f"ATESD_NATIVE_LIBRARY={os.environ['ATESD_NATIVE_LIBRARY']} is not a file")
    raise ImportError("native CPU kernel not built: run `make setup` (or see docs/native.md)")


LIBRARY = _load()
