// The Python extension module actreplay_ext._C: importing it loads the operator
// library (ops.cpp registers torch.ops.actreplay); it adds build_info().
#include <torch/extension.h>

#ifdef ACTREPLAY_WITH_CUDA
#include <cuda.h>
#endif

#ifndef ACTREPLAY_CUDA_ARCHS
#define ACTREPLAY_CUDA_ARCHS ""
#endif
#ifndef ACTREPLAY_TORCH_VERSION
#define ACTREPLAY_TORCH_VERSION "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef ACTREPLAY_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." +
                         std::to_string((CUDA_VERSION % 1000) / 10);
  info["cuda_archs"] = std::string(ACTREPLAY_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::string(ACTREPLAY_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "actreplay_ext C++/CUDA operators (registered under torch.ops.actreplay)";
  m.def("build_info", &build_info,
        "How the extension was built: CUDA kernels compiled or not, CUDA version, target "
        "archs, and the torch version it was compiled against.");
}
