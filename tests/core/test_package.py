"""The package as a user imports it: the public API, the library apart from the
tools around it, and a source tree without the compiled extension, which says in
one line what to do."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, installed_elsewhere, source_copy

import actreplay_ext as ar

PUBLIC = ["patch", "apply", "compute_targets", "optimize", "ReplayConfig", "ReplayTargets", "ReplayResult",
          "ReplayHandle", "ops", "reference", "tiny", "get_adapter", "register_adapter", "supported_families",
          "build_info", "PRESETS"]


def test_the_public_api_is_there():
    for name in PUBLIC:
        assert hasattr(ar, name), name
    assert callable(ar.patch) and callable(ar.apply)
    assert len(ar.supported_families()) >= 9


def test_the_library_does_not_load_the_tools():
    """Imports run one way: the tools (actreplay_ext.tools) use the library, and importing
    any part of the library loads none of them."""
    code = ("import sys, actreplay_ext, actreplay_ext.core, actreplay_ext.hooks, actreplay_ext.models, "
            "actreplay_ext.reference, actreplay_ext.tiny\n"
            "print(sorted(m for m in sys.modules if m.startswith('actreplay_ext.tools')))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_tools_live_in_their_own_package():
    from actreplay_ext.tools import ablate, analysis, checks, cli, console, data, passk, provenance, verify  # noqa: F401

    flat = [m for m in ("cli", "passk", "ablate", "analysis", "checks", "console", "provenance", "data", "verify",
                        "moved") if os.path.exists(os.path.join(ROOT, "actreplay_ext", f"{m}.py"))]
    assert flat == []


def test_a_source_tree_without_the_build_and_nothing_installed_says_what_to_do(tmp_path):
    env = source_copy(tmp_path)
    # torch first, then every other copy of the package out of reach (site-packages, an
    # editable install's finder): the working directory's source tree is all there is
    code = ("import sys, torch; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "sys.path[:] = [p for p in sys.path if p in ('', '.') or 'packages' not in p]; import actreplay_ext")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: actreplay_ext: the compiled extension actreplay_ext._C cannot be imported")
    assert "pip install --no-build-isolation ." in last and "build_ext --inplace" in last
    assert "circular import" not in out.stderr.lower()


def test_python_m_from_the_repository_root_uses_the_installed_package(tmp_path):
    """`python -m actreplay_ext` from a clone's root, where the source tree has no _C: the
    installed package runs, with a one-line note (lmms-eval's entry point:
    tests/integrations/test_lmms_eval.py)."""
    env = source_copy(tmp_path)
    out = subprocess.run([sys.executable, "-m", "actreplay_ext", "--version"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("actreplay_ext 0.1.0")
    site, no_editable = installed_elsewhere(tmp_path)
    env["PYTHONPATH"] = site
    code = no_editable + ("import runpy; sys.argv = ['actreplay_ext', '--version']; "
                          "runpy.run_module('actreplay_ext', run_name='__main__', alter_sys=True)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("actreplay_ext 0.1.0")
    note = [line for line in out.stderr.splitlines() if "has no compiled extension" in line]
    assert len(note) == 1 and f"using the installed package at {site}" in note[0] and str(tmp_path) in note[0]


def test_torchrun_m_from_the_repository_root_runs_on_every_rank(tmp_path):
    """Every worker imports the working directory's source tree first (under a plain install, as
    in CI; an editable install's finder maps the name to the built tree before that)."""
    env = {**source_copy(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "actreplay_ext", "--version"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("actreplay_ext 0.1.0") == 2


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
