// The Python module barrier_ops._C. It holds no Python functions: importing
// it loads the shared library, whose static initialisers register the ops
// with torch.library (pattern of pytorch/extension-cpp).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "barrier_ops compiled ops (registered in torch.ops.barrier_ops)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
