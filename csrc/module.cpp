// kvplug._C: the Python module is empty; every op registers itself into the
// torch.ops.kvplug_C namespace from its own csrc/<op>.cu with TORCH_LIBRARY_FRAGMENT,
// so ops can be added without touching a shared bindings file.
#include <torch/extension.h>

TORCH_LIBRARY(kvplug_C, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvplug CUDA kernels; ops live in torch.ops.kvplug_C";
}
