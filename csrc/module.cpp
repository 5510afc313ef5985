// pybind11 entry point of icons_fast._C. Ops are registered from their own
// translation units; this file only holds the module and capability queries.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "icons-fast native ops (C++17 CPU path; CUDA path when built with nvcc)";
  m.def("has_cuda", []() {
#ifdef ICONS_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA path was compiled in.");
}
