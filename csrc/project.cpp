// project op (to be filled in).
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_project(py::module_& m) { (void)m; }
