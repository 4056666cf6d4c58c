"""Builds actreplay_ext._C: the CPU kernels always, the CUDA kernels whenever a
CUDA toolkit and a CUDA build of torch are present.

Environment switches:
  ACTREPLAY_CPU_ONLY=1   never compile CUDA sources
  FORCE_CUDA=1           compile them even if torch sees no GPU (the normal case
                         on a build machine; a toolkit is still required)
  TORCH_CUDA_ARCH_LIST   overrides the default targets "8.0;9.0"
  CUDA_HOME / CUDA_PATH  the toolkit, if it is not found on its own
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(home):
    return os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h")
    )


def _find_cuda_home(torch_cuda_version):
    """The toolkit directory, without the user having to set CUDA_HOME."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and _is_toolkit(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc may be a symlink or a wrapper script (e.g. /usr/local/bin/nvcc that
        # execs the toolkit's): resolve links, then look inside small scripts.
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(home):
            return home
        if os.path.getsize(real) < 65536:
            with open(real, "rb") as f:
                head = f.read().decode("utf-8", "ignore")
            for token in head.split():
                if token.endswith("/bin/nvcc"):
                    home = os.path.dirname(os.path.dirname(token))
                    if _is_toolkit(home):
                        return home
    candidates = []
    if torch_cuda_version:
        candidates.append(f"/usr/local/cuda-{torch_cuda_version}")
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return c
    return None


def _pip_cuda_include_dirs():
    """Headers that torch's pip CUDA wheels ship (cuBLAS, cuSPARSE, ...).

    A bare toolkit (e.g. only nvcc + cudart) lacks them, but ATen's CUDA
    headers include cublas_v2.h. Added with -isystem so the toolkit's own
    headers keep precedence where both exist."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return dirs
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _process_libstdcxx():
    """The libstdc++ this process has loaded (torch's libraries load it), or None.

    The extension links it explicitly, so that it calls the C++ runtime torch
    calls. A compiler that links libstdc++ statically (a wrapper adding
    -static-libstdc++, or a toolchain with only libstdc++.a) would otherwise put
    a private copy into _C, and with -Bsymbolic-functions (Debian/Ubuntu
    Python's LDSHARED) _C calls that copy on streams set up by the shared one:
    every number formatted into an error message was lost or crashed the
    process (seen on an H200 machine whose CXX was such a compiler)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[5]).startswith("libstdc++.so"):
                    return fields[5]
    except OSError:
        pass
    return None


def _needed_libraries(path):
    """The DT_NEEDED entries of a shared object, or None when readelf is missing."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def _check_shared_libstdcxx(path):
    needed = _needed_libraries(path)
    if needed is not None and not any(n.startswith("libstdc++.so") for n in needed):
        raise RuntimeError(
            f"actreplay_ext: {path} does not load the shared libstdc++ (it needs {needed}): the compiler "
            f"(CXX={os.environ.get('CXX', 'unset')!r}) linked a private static copy, which breaks error "
            "messages and can crash the process. Build with a compiler that links libstdc++ dynamically "
            "(e.g. CXX=g++)."
        )


def _announce(sources, duration):
    """What the build compiles and how long that takes (pip shows it with -v; without, only
    "still running..."), measured on the CI machine (2 cores) and an H200 host (16)."""
    cu = sum(src.endswith(".cu") for src in sources)
    jobs = os.environ.get("MAX_JOBS") or f"{os.cpu_count()} (all cores)"
    print(f"actreplay_ext: compiling {len(sources) - cu} C++ and {cu} CUDA sources, MAX_JOBS={jobs}: {duration}",
          flush=True)


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cpu_only = _truthy("ACTREPLAY_CPU_ONLY")
    force = _truthy("FORCE_CUDA")
    cuda_home = None if cpu_only else _find_cuda_home(torch.version.cuda)
    with_cuda = (not cpu_only) and torch.version.cuda is not None and cuda_home is not None
    if force and not with_cuda:
        raise RuntimeError(
            "FORCE_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={cuda_home!r} "
            "(set CUDA_HOME to the toolkit, or unset FORCE_CUDA)"
        )
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # read at import time by torch
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is inlined into our code and runs serially
    # without it (torch's OpenMP backend); torch ships the libgomp it loads.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    libstdcxx = _process_libstdcxx()
    if libstdcxx:
        link_flags.append(libstdcxx)
    define_macros = [("ACTREPLAY_TORCH_VERSION", f'"{torch.__version__}"')]
    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros += [
            ("ACTREPLAY_WITH_CUDA", None),
            ("ACTREPLAY_CUDA_ARCHS", f'"{archs}"'),
        ]
        system_includes = []
        for d in _pip_cuda_include_dirs():
            system_includes += ["-isystem", d]
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        print(f"actreplay_ext: building CUDA kernels with {cuda_home} for archs {archs}")
        _announce(sources, "about 7 min on 2 cores, 1 min on 16; ACTREPLAY_CPU_ONLY=1 builds the CPU kernels alone")
        return [
            cpp_extension.CUDAExtension(
                "actreplay_ext._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=define_macros,
                extra_compile_args={
                    "cxx": cxx_flags + system_includes,
                    "nvcc": nvcc_flags + system_includes,
                },
                extra_link_args=link_flags,
            )
        ]
    print(
        "actreplay_ext: building CPU kernels only "
        + ("(ACTREPLAY_CPU_ONLY=1)" if cpu_only else
           f"(torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={cuda_home!r})")
    )
    _announce(sources, "about 2 min on 2 cores")
    return [
        cpp_extension.CppExtension(
            "actreplay_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


def _extras():
    """Optional dependencies. torchvision (which the Qwen processors' video
    processor needs, and the tests and `analyze --demo` build processors) is pinned to the release
    that matches the torch this build compiles against (torchvision 0.(m+15)
    pairs with torch 2.m since torch 2.0): unpinned, pip would pull the newest
    torchvision and upgrade torch under the compiled extension."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    torchvision = f"torchvision=={major - 2}.{minor + 15}.*" if major == 2 else "torchvision"
    analyze = ["matplotlib>=3.5", torchvision]  # torchvision: the Qwen processors (analyze --demo) need it
    video = [torchvision, "av>=12"]  # PyAV decodes video files (actreplay_ext.tools.data.decode_video)
    return {
        "analyze": analyze,
        "video": video,
        "test": ["pytest>=7", "hypothesis>=6", "accelerate", "ruff>=0.17,<0.18", *analyze, *video],
        # lmms-eval 0.7.3 fails inside simple_evaluate with filelock >= 4.3 (no filelock._api) and still exits 0
        "lmms": ["lmms-eval==0.7.3", "filelock<4.3", "accelerate", *video],
        "flash": ["flash-attn>=2.6"],
    }


def main():
    from torch.utils.cpp_extension import BuildExtension

    class BuildChecked(BuildExtension.with_options(use_ninja=True)):
        def build_extensions(self):
            super().build_extensions()
            for ext in self.extensions:
                _check_shared_libstdcxx(self.get_ext_fullpath(ext.name))

    setup(
        packages=find_packages(include=["actreplay_ext", "actreplay_ext.*"]),
        extras_require=_extras(),
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildChecked},
    )


if __name__ == "__main__":
    sys.exit(main())
