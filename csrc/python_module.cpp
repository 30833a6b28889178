// The Python module adaperceiver._C: loading it registers the ops (ops.cpp, cuda/register.cpp:
// static TORCH_LIBRARY initialisers); build_info() returns the compile-time facts as a dict of
// strings. Written against the Python C API alone: with torch/extension.h (pybind11 and the
// whole torch API) this one-function file took longer to compile than any kernel.
// Not part of the CMake build (no Python there).
#include <Python.h>

#include "build_facts.h"

namespace {

PyObject* build_info(PyObject*, PyObject*) {
  PyObject* facts = PyDict_New();
  if (facts == nullptr) return nullptr;
  for (const auto& kv : adaperceiver::build_facts()) {
    PyObject* value = PyUnicode_FromString(kv.second.c_str());
    if (value == nullptr || PyDict_SetItemString(facts, kv.first.c_str(), value) < 0) {
      Py_XDECREF(value);
      Py_DECREF(facts);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return facts;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Compile-time facts of this build (strings)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "adaperceiver compiled kernels (ops live in torch.ops.adaperceiver)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
