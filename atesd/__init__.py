"""atesd: the one import path of this project, so it never shadows another distribution.

    from atesd.kernels import fused_linear_kl     # the fused clipped-KL op (usable alone)
    from atesd import controller                  # exposure policies
    python -m atesd.engine.train                  # the engine (also `atesd-train`, or `python -m engine.train`
                                                  # from a checkout)

The repository keeps ``kernels/``, ``engine/`` and ``controller/`` at its top. Installed (wheel), they sit inside
this package; in a checkout they sit beside this folder, and ``__path__`` is extended to the checkout root so
``atesd.kernels`` is ``<checkout>/kernels``. Every project import is absolute (``from atesd.engine.models import
...``), so a module has one name wherever it runs from.

``kernels`` is also Hugging Face's distribution (imported by transformers and TRL) and ``controller`` is taken on
PyPI: with a checkout on ``sys.path`` (its root as the working directory), a plain ``import kernels`` would find
this folder first. ``kernels/__init__.py`` then calls :func:`defer_top_level`, which loads the distribution that
owns the name instead, or leaves an empty module, as if this checkout were not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(_HERE)
if not os.path.isdir(os.path.join(_HERE, "kernels")):  # a checkout: the packages are siblings of this folder
    __path__.append(_CHECKOUT)  # noqa: F821  (the package's own __path__)

__version__ = "0.1.0"


def defer_top_level(module: types.ModuleType) -> None:
    """``module`` is a checkout folder imported by its bare name (``kernels``): put the installed distribution of
    that name in its place in ``sys.modules``. With none installed, leave it looking like the empty namespace
    folder it would be without an ``__init__.py`` (no ``__file__``, no attributes): transformers probes for
    Hugging Face's ``kernels`` this way and must conclude it is absent."""
    name = module.__name__
    here = os.path.realpath(_CHECKOUT)
    search = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        module.__file__ = None

        def __getattr__(attr: str):
            raise AttributeError(f"module {name!r} has no attribute {attr!r} (this checkout's {name}/ folder is "
                                 f"imported as 'atesd.{name}')")

        module.__getattr__ = __getattr__
        return
    owner = importlib.util.module_from_spec(spec)
    sys.modules[name] = owner
    spec.loader.exec_module(owner)
