// Python module bns_pipe._C. Importing it runs the static TORCH_LIBRARY_FRAGMENT
// registrations of every op file in csrc/; the ops are then torch.ops.bns_pipe.*.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bns_pipe graph ops; call them through torch.ops.bns_pipe";
}
