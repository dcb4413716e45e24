// Makes bnao._C importable as a Python module. Importing it runs the static
// registrations (TORCH_LIBRARY / TORCH_LIBRARY_IMPL) of every linked source;
// the ops are then reached through torch.ops.bnao.*.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "bnao compiled ops (use torch.ops.bnao)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
