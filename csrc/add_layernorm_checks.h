// Input checks and output allocation of the fused residual add + LayerNorm ops, shared by the CPU and
// CUDA implementations.
// Messages name the op, the argument and what was expected (FLASH_CHECK_VALUE -> ValueError,
// FLASH_CHECK_TYPE -> TypeError), and every check runs before any output is allocated.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "flash_checks.h"

namespace flash {

constexpr const char* kAddLnFwdOp = "flash_attn.add_layernorm_fwd";
constexpr const char* kAddLnBwdOp = "flash_attn.add_layernorm_bwd";

// rows = product of every dim but the last; width = the last dim (the normalised one).
struct AddLnShape {
  int64_t rows;
  int64_t width;
};

inline void addln_check_last_dim(const char* op, const char* name, const at::Tensor& t) {
  FLASH_CHECK_VALUE(t.dim() >= 1, op, ": expected ", name, " to have at least 1 dim, got a 0-dim tensor");
  FLASH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": expected ", name,
                    " to have a contiguous last dim (stride 1), got strides ", t.strides(),
                    "; call .contiguous() first");
}

inline void addln_check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  FLASH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have ", ref_name,
                   "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
  FLASH_CHECK_VALUE(t.device() == ref.device(), op, ": expected ", name, " on ", ref_name, "'s device ",
                    ref.device(), ", got ", t.device());
}

inline void addln_check_same_shape(const char* op, const char* name, const at::Tensor& t,
                                   const char* ref_name, const at::Tensor& ref) {
  FLASH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": expected ", name, " of ", ref_name, "'s shape ",
                    ref.sizes(), ", got ", t.sizes());
}

// weight (and bias): (N,) with N the last dim of the reference tensor.
inline void addln_check_param(const char* op, const char* name, const at::Tensor& p, const char* ref_name,
                              const at::Tensor& ref) {
  addln_check_like(op, name, p, ref_name, ref);
  FLASH_CHECK_VALUE(p.dim() == 1 && p.size(0) == ref.size(-1), op, ": expected ", name,
                    " of shape (N,) with N = ", ref.size(-1), " (the last dim of ", ref_name, "), got ",
                    p.sizes());
}

// The float32 statistics: shape of s without its last dim.
inline void addln_check_stat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& s) {
  FLASH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": expected ", name, " to be float32, got ",
                   t.scalar_type());
  FLASH_CHECK_VALUE(t.device() == s.device(), op, ": expected ", name, " on s's device ", s.device(),
                    ", got ", t.device());
  FLASH_CHECK_VALUE(t.sizes() == s.sizes().slice(0, s.dim() - 1), op, ": expected ", name,
                    " of shape s.shape[:-1] = ", s.sizes().slice(0, s.dim() - 1), ", got ", t.sizes());
}

inline AddLnShape addln_shape(const at::Tensor& t) {
  const int64_t width = t.size(-1);
  return AddLnShape{width == 0 ? 0 : t.numel() / width, width};
}

inline void addln_check_width(const char* op, const char* name, const at::Tensor& t) {
  FLASH_CHECK_VALUE(t.size(-1) >= 1, op, ": expected ", name, " to have a last dim of at least 1, got shape ",
                    t.sizes());
}

// forward: x, residual (..., N) of one shape; weight (N,), optional bias (N,); one dtype and device.
inline AddLnShape check_add_layernorm_fwd_inputs(const at::Tensor& x, const at::Tensor& residual,
                                                 const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, double eps) {
  const char* op = kAddLnFwdOp;
  addln_check_last_dim(op, "x", x);
  addln_check_width(op, "x", x);
  addln_check_last_dim(op, "residual", residual);
  addln_check_like(op, "residual", residual, "x", x);
  addln_check_same_shape(op, "residual", residual, "x", x);
  addln_check_param(op, "weight", weight, "x", x);
  if (bias.has_value()) addln_check_param(op, "bias", *bias, "x", x);
  FLASH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": expected eps to be finite and >= 0, got ", eps);
  return addln_shape(x);
}

// backward: dy and optional ds of s's shape and dtype; mean, rstd (s.shape[:-1]) float32; weight (N,).
inline AddLnShape check_add_layernorm_bwd_inputs(const at::Tensor& dy, const std::optional<at::Tensor>& ds,
                                                 const at::Tensor& s, const at::Tensor& mean,
                                                 const at::Tensor& rstd, const at::Tensor& weight) {
  const char* op = kAddLnBwdOp;
  addln_check_last_dim(op, "s", s);
  addln_check_width(op, "s", s);
  addln_check_last_dim(op, "dy", dy);
  addln_check_like(op, "dy", dy, "s", s);
  addln_check_same_shape(op, "dy", dy, "s", s);
  if (ds.has_value()) {
    addln_check_last_dim(op, "ds", *ds);
    addln_check_like(op, "ds", *ds, "s", s);
    addln_check_same_shape(op, "ds", *ds, "s", s);
  }
  addln_check_stat(op, "mean", mean, s);
  addln_check_stat(op, "rstd", rstd, s);
  addln_check_param(op, "weight", weight, "s", s);
  return addln_shape(s);
}

// The forward's contiguous inputs and its outputs, allocated (and poisoned) the same way on every device.
struct AddLnFwdTensors {
  at::Tensor x, residual, weight;
  std::optional<at::Tensor> bias;
  at::Tensor y, s, mean, rstd;  // y, s like x; mean, rstd (x.shape[:-1]) float32
};

inline AddLnFwdTensors prepare_add_layernorm_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                 const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias) {
  AddLnFwdTensors t;
  t.x = x.contiguous();
  t.residual = residual.contiguous();
  t.weight = weight.contiguous();
  if (bias.has_value()) t.bias = bias->contiguous();
  t.y = at::empty(t.x.sizes(), t.x.options());
  t.s = at::empty(t.x.sizes(), t.x.options());
  const auto stat_sizes = t.x.sizes().slice(0, t.x.dim() - 1);
  t.mean = at::empty(stat_sizes, t.x.options().dtype(at::kFloat));
  t.rstd = at::empty(stat_sizes, t.x.options().dtype(at::kFloat));
  poison({&t.y, &t.s, &t.mean, &t.rstd});
  return t;
}

// The backward's contiguous inputs and its outputs; with no rows, dweight and dbias are already 0.
struct AddLnBwdTensors {
  at::Tensor dy, s, mean, rstd, weight;
  std::optional<at::Tensor> ds;
  at::Tensor dx, dweight, dbias;  // dx like s; dweight, dbias like weight
};

inline AddLnBwdTensors prepare_add_layernorm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& ds,
                                                 const at::Tensor& s, const at::Tensor& mean,
                                                 const at::Tensor& rstd, const at::Tensor& weight,
                                                 const AddLnShape& shape) {
  AddLnBwdTensors t;
  t.dy = dy.contiguous();
  t.s = s.contiguous();
  t.mean = mean.contiguous();
  t.rstd = rstd.contiguous();
  t.weight = weight.contiguous();
  if (ds.has_value()) t.ds = ds->contiguous();
  t.dx = at::empty(t.s.sizes(), t.s.options());
  t.dweight = at::empty(t.weight.sizes(), t.weight.options());
  t.dbias = at::empty(t.weight.sizes(), t.weight.options());
  poison({&t.dx, &t.dweight, &t.dbias});
  if (shape.rows == 0) {
    t.dweight.zero_();
    t.dbias.zero_();
  }
  return t;
}

// The dtypes with kernels: float32, float16 and bfloat16 (computed in float32) on both devices.
inline void check_add_layernorm_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  FLASH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": expected ",
                   name, " to be float32, float16 or bfloat16, got ", dtype);
}

}  // namespace flash
