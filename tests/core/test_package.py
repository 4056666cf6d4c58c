"""The package as a user imports it: the public API, old import paths (they
keep working with a DeprecationWarning, or fail naming the new place), and a
source tree without the compiled extension, which says in one line what to do."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
from helpers import ROOT

import actreplay_ext as ar
from actreplay_ext import moved

PUBLIC = ["patch", "apply", "compute_targets", "optimize", "ReplayConfig", "ReplayTargets", "ReplayResult",
          "ReplayHandle", "ops", "reference", "tiny", "get_adapter", "register_adapter", "supported_families",
          "build_info", "PRESETS"]


def test_the_public_api_is_there():
    for name in PUBLIC:
        assert hasattr(ar, name), name
    assert callable(ar.patch) and callable(ar.apply)
    assert len(ar.supported_families()) >= 9


@pytest.mark.parametrize("old,new", sorted(moved.MODULES.items()))
def test_moved_modules_still_import_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; import from {new}"):
        module = __import__(old, fromlist=["_"])
    assert module is sys.modules[new]


@pytest.mark.parametrize("old,name", [(old, name) for old, table in sorted(moved.NAMES.items())
                                      for name in sorted(table)])
def test_moved_names_resolve_or_name_their_replacement(old, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        where = moved.NAMES[old][name]
        if where.startswith("!"):
            with pytest.raises(ImportError, match=f"{old}.{name} is gone: .*actreplay_ext\\."):
                exec(f"from {old} import {name}", {})
            return
        scope = {}
        exec(f"from {old} import {name}", scope)
    module, attr = where.split(":")
    assert scope[name] is getattr(__import__(module, fromlist=[attr]), attr)


def test_the_old_patch_module_names_the_new_place():
    with pytest.raises(ImportError, match="moved to actreplay_ext.hooks"):
        exec("from actreplay_ext.patch import ReplayHandle", {})
    assert callable(ar.patch)  # the function, untouched by the attempt


def test_a_source_tree_without_the_build_says_what_to_do(tmp_path):
    src = tmp_path / "actreplay_ext"
    shutil.copytree(os.path.join(ROOT, "actreplay_ext"), src,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The source tree in the working directory comes first, as from a clone's root (an editable
    # install's own finder, which would map the name back to the built tree, is taken out).
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import actreplay_ext")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: actreplay_ext: the compiled extension actreplay_ext._C cannot be imported")
    assert "pip install --no-build-isolation ." in last and "build_ext --inplace" in last
    assert "circular import" not in out.stderr.lower()


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("actreplay_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() runs only as a script
    return mod


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="ELF and readelf only")
def test_the_extension_calls_the_processs_libstdcxx():
    """_C loads the shared libstdc++ torch loads, never a private static copy: with one
    (a compiler that linked libstdc++ statically, on an H200 machine) every number
    in an error message was lost, or the process crashed at the first bad argument."""
    import actreplay_ext._C as C

    setup = _setup_module()
    needed = setup._needed_libraries(C.__file__)
    assert any(n.startswith("libstdc++.so") for n in needed), needed
    loaded = setup._process_libstdcxx()
    assert loaded and os.path.basename(loaded).startswith("libstdc++.so")
    # and the build refuses an extension without it, naming the compiler
    libc = next(line.split()[5] for line in open("/proc/self/maps") if len(line.split()) >= 6
                and os.path.basename(line.split()[5]).startswith("libc.so"))  # needs no libstdc++
    with pytest.raises(RuntimeError, match="does not load the shared libstdc\\+\\+.*CXX="):
        setup._check_shared_libstdcxx(libc)
