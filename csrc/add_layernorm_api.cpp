// The fused residual add + LayerNorm ops, added to the flash_attn op library: schemas only. The CPU and
// CUDA implementations register themselves apart (cpu/add_layernorm_cpu.cpp,
// cuda/add_layernorm_cuda_api.cpp), the forward's autograd too (add_layernorm_autograd.cpp); the Python side
// (transformer/add_layernorm.py) adds the fake (meta) kernels.
//
//   add_layernorm_fwd: s = x + residual; y = (s - mean) * rstd * weight + bias over the last dim.
//     x, residual (..., N); weight, bias (N,); all one dtype. Returns y, s (..., N) contiguous in that
//     dtype and mean, rstd (...) float32, rstd = 1 / sqrt(var + eps) with the biased variance.
//   add_layernorm_bwd: gradients of both outputs. dy (..., N) flows into y, ds (optional, ..., N) into
//     s. Returns dx (..., N) (the gradient of x and of residual, which are the same), dweight, dbias (N,).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(flash_attn, m) {
  m.def(
      "add_layernorm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps) -> "
      "(Tensor y, Tensor s, Tensor mean, Tensor rstd)");
  m.def(
      "add_layernorm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor mean, Tensor rstd, Tensor weight) -> "
      "(Tensor dx, Tensor dweight, Tensor dbias)");
}
