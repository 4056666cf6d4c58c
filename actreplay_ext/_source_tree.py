"""A source tree without its compiled extension, imported in place of the
installed package.

`python -m ...` and `torchrun -m ...` put the working directory first on
sys.path, so from the repository root (where the quick start leaves a user)
`import actreplay_ext` finds the source tree, whose `_C` was built into the
installed copy and not here. Rather than fail there, the package that was
installed is imported instead, with a one-line note saying which.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from typing import Optional


def _has_extension(directory: str) -> bool:
    try:
        return any(f.startswith("_C.") for f in os.listdir(directory))
    except OSError:
        return False


def installed_spec(name: str, source: str) -> Optional[importlib.machinery.ModuleSpec]:
    """The spec of package `name` as installed (with its compiled _C) anywhere
    but the source tree `source`; None when there is no such copy."""
    source = os.path.realpath(source)
    parent = os.path.dirname(source)
    others = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != parent]
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(name, others)
            elif hasattr(finder, "find_spec"):  # an editable install's finder, among others
                spec = finder.find_spec(name, None)
            else:
                continue
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        if locations and os.path.realpath(locations[0]) != source and _has_extension(locations[0]):
            return spec
    return None


def import_installed_instead(name: str, source: str) -> bool:
    """Import the installed package in place of the source tree `source` (as
    sys.modules[name], which the import statement then returns); False when
    there is none to import."""
    spec = installed_spec(name, source)
    if spec is None:
        return False
    location = list(spec.submodule_search_locations)[0]
    sys.stderr.write(f"actreplay_ext: {source} (the working directory's source tree) has no compiled extension; "
                     f"using the installed package at {location}\n")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return True
