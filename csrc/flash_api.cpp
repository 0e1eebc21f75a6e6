// The flash_attn op library: schemas only. The CPU and CUDA implementations register themselves
// apart (cpu/flash_{fwd,bwd}_cpu.cpp, cuda/flash_{fwd,bwd}_api.cpp), the forward's autograd too
// (flash_autograd.cpp); the Python side (attention_backends/flash_ops.py) adds the fake (meta) kernels.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing the extension (import attention_backends._C) runs the static TORCH_LIBRARY initialisers.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(flash_attn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? seqlens_k, float scale, "
      "bool is_causal) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
      "Tensor? seqlens_k, float scale, bool is_causal) -> (Tensor dq, Tensor dk, Tensor dv)");
}
