// pybind11 entry point of icons_fast._C. Each op lives in its own translation
// unit and registers its functions here; this file only holds the module and
// the capability queries.
#include <pybind11/pybind11.h>

#include <string>

#include "runtime_probe.h"

namespace py = pybind11;

void register_project(py::module_& m);    // project.cpp: Rademacher sign tiles
void register_influence(py::module_& m);  // influence.cpp: blocked influence reductions

PYBIND11_MODULE(_C, m) {
  m.doc() = "icons-fast native ops (C++17 CPU path; CUDA path when built with nvcc)";
  m.def("has_cuda", []() {
#ifdef ICONS_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA path was compiled in.");
  m.def("cuda_runtime_status", []() -> std::string {
#ifdef ICONS_FAST_WITH_CUDA
    return icons_fast::cuda_runtime_status();
#else
    return "the extension was built without its CUDA path (set ICONS_FAST_FORCE_CUDA_BUILD=1 and rebuild)";
#endif
  }, "'' when a probe kernel of this build runs on the current CUDA device, else one line saying why not.");
  m.def("cuda_archs", []() { return std::string(ICONS_FAST_CUDA_ARCH_LIST); },
        "The ICONS_FAST_CUDA_ARCHS the CUDA path was compiled for ('unknown' when not recorded).");
  register_project(m);
  register_influence(m);
}
