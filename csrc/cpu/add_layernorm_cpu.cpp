// CPU implementation of flash_attn::add_layernorm_fwd / add_layernorm_bwd (fused residual add + LayerNorm).
//
// Rows are split over threads with at::parallel_for (OpenMP); the loops over a row are `omp simd` loops
// the compiler vectorises (-O3 -march=native -fopenmp). Arithmetic is float32 for every dtype. The sum s
// is rounded to the input dtype first and the statistics are taken over the rounded s, so the forward
// normalises exactly the s it returns (and the backward, which reads s back, sees the same values).
// dweight and dbias: each thread part accumulates its own float32 partial row, summed in part order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../add_layernorm_checks.h"

namespace flash {
namespace cpu {
namespace {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// A (N,) parameter as float32: the data itself for float, else a converted copy in `storage`.
template <typename T>
const float* as_float(const T* p, int64_t n, std::vector<float>& storage) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    storage.resize(n);
    for (int64_t j = 0; j < n; ++j) storage[j] = to_float(p[j]);
    return storage.data();
  }
}

template <typename T>
struct FwdArgs {
  const T* x;
  const T* residual;
  const T* weight;
  const T* bias;  // nullptr: no bias
  T* y;
  T* s;
  float* mean;
  float* rstd;
  int64_t n;
  float eps;
};

template <typename T>
void fwd_rows(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  std::vector<float> w_storage, b_storage, s_storage;
  const float* w = as_float(a.weight, n, w_storage);
  const float* b = a.bias != nullptr ? as_float(a.bias, n, b_storage) : nullptr;
  if constexpr (!std::is_same_v<T, float>) s_storage.resize(n);
  const float inv_n = 1.0f / static_cast<float>(n);

  for (int64_t row = begin; row < end; ++row) {
    const T* x = a.x + row * n;
    const T* r = a.residual + row * n;
    T* s_out = a.s + row * n;
    T* y = a.y + row * n;
    // s in float32 (already rounded to T): the output row itself for float, else a scratch row.
    float* s;
    float sum = 0.0f;
    if constexpr (std::is_same_v<T, float>) {
      s = s_out;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const float v = x[j] + r[j];
        s[j] = v;
        sum += v;
      }
    } else {
      s = s_storage.data();
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) {
        const T rounded = static_cast<T>(to_float(x[j]) + to_float(r[j]));
        s_out[j] = rounded;
        const float v = to_float(rounded);
        s[j] = v;
        sum += v;
      }
    }
    const float mu = sum * inv_n;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < n; ++j) {
      const float d = s[j] - mu;
      sq += d * d;
    }
    const float rs = 1.0f / std::sqrt(sq * inv_n + a.eps);
    a.mean[row] = mu;
    a.rstd[row] = rs;
    if (b != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>((s[j] - mu) * rs * w[j] + b[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) y[j] = static_cast<T>((s[j] - mu) * rs * w[j]);
    }
  }
}

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* ds;  // nullptr: no gradient into s
  const T* s;
  const float* mean;
  const float* rstd;
  const T* weight;
  T* dx;
  float* dweight_part;  // (parts, N)
  float* dbias_part;    // (parts, N)
  int64_t rows;
  int64_t n;
};

// One part: rows [part * rows / parts, (part + 1) * rows / parts), with its own dweight/dbias partial row.
//   xhat = (s - mean) * rstd, g = dy * weight,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds.
template <typename T>
void bwd_part(const BwdArgs<T>& a, int64_t part, int64_t parts) {
  const int64_t n = a.n;
  const int64_t begin = part * a.rows / parts;
  const int64_t end = (part + 1) * a.rows / parts;
  std::vector<float> w_storage;
  const float* w = as_float(a.weight, n, w_storage);
  std::vector<float> scratch(2 * n);
  float* xhat = scratch.data();
  float* g = scratch.data() + n;
  float* dw = a.dweight_part + part * n;
  float* db = a.dbias_part + part * n;
  std::fill(dw, dw + n, 0.0f);
  std::fill(db, db + n, 0.0f);
  const float inv_n = 1.0f / static_cast<float>(n);

  for (int64_t row = begin; row < end; ++row) {
    const T* s = a.s + row * n;
    const T* dy = a.dy + row * n;
    T* dx = a.dx + row * n;
    const float mu = a.mean[row];
    const float rs = a.rstd[row];
    float sum_g = 0.0f;
    float sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t j = 0; j < n; ++j) {
      const float xh = (to_float(s[j]) - mu) * rs;
      const float d = to_float(dy[j]);
      const float gj = d * w[j];
      xhat[j] = xh;
      g[j] = gj;
      sum_g += gj;
      sum_gx += gj * xh;
      dw[j] += d * xh;
      db[j] += d;
    }
    const float c_g = sum_g * inv_n;
    const float c_gx = sum_gx * inv_n;
    if (a.ds != nullptr) {
      const T* ds = a.ds + row * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        dx[j] = static_cast<T>(rs * (g[j] - c_g - xhat[j] * c_gx) + to_float(ds[j]));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dx[j] = static_cast<T>(rs * (g[j] - c_g - xhat[j] * c_gx));
    }
  }
}

template <typename T>
void run_fwd(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
             const std::optional<at::Tensor>& bias, at::Tensor& y, at::Tensor& s, at::Tensor& mean,
             at::Tensor& rstd, const AddLnShape& shape, double eps) {
  FwdArgs<T> a;
  a.x = x.const_data_ptr<T>();
  a.residual = residual.const_data_ptr<T>();
  a.weight = weight.const_data_ptr<T>();
  a.bias = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
  a.y = y.mutable_data_ptr<T>();
  a.s = s.mutable_data_ptr<T>();
  a.mean = mean.mutable_data_ptr<float>();
  a.rstd = rstd.mutable_data_ptr<float>();
  a.n = shape.width;
  a.eps = static_cast<float>(eps);
  // A grain of rows worth about 32k elements keeps small calls on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / shape.width);
  at::parallel_for(0, shape.rows, grain, [&](int64_t begin, int64_t end) { fwd_rows(a, begin, end); });
}

template <typename T>
void run_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& ds, const at::Tensor& s,
             const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight, at::Tensor& dx,
             at::Tensor& dweight, at::Tensor& dbias, const AddLnShape& shape) {
  const int64_t n = shape.width;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), shape.rows));
  std::vector<float> partials(static_cast<size_t>(2 * parts * n));
  BwdArgs<T> a;
  a.dy = dy.const_data_ptr<T>();
  a.ds = ds.has_value() ? ds->const_data_ptr<T>() : nullptr;
  a.s = s.const_data_ptr<T>();
  a.mean = mean.const_data_ptr<float>();
  a.rstd = rstd.const_data_ptr<float>();
  a.weight = weight.const_data_ptr<T>();
  a.dx = dx.mutable_data_ptr<T>();
  a.dweight_part = partials.data();
  a.dbias_part = partials.data() + parts * n;
  a.rows = shape.rows;
  a.n = n;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) bwd_part(a, part, parts);
  });
  T* dw = dweight.mutable_data_ptr<T>();
  T* db = dbias.mutable_data_ptr<T>();
  for (int64_t j = 0; j < n; ++j) {
    float sw = 0.0f;
    float sb = 0.0f;
    for (int64_t p = 0; p < parts; ++p) {
      sw += a.dweight_part[p * n + j];
      sb += a.dbias_part[p * n + j];
    }
    dw[j] = static_cast<T>(sw);
    db[j] = static_cast<T>(sb);
  }
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: break;  // rejected by check_add_layernorm_dtype
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& residual_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  const AddLnShape shape = check_add_layernorm_fwd_inputs(x_in, residual_in, weight_in, bias_in, eps);
  check_add_layernorm_dtype(kAddLnFwdOp, "x", x_in);
  AddLnFwdTensors t = prepare_add_layernorm_fwd(x_in, residual_in, weight_in, bias_in);
  if (shape.rows > 0) {
    dispatch_dtype(t.x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      run_fwd<T>(t.x, t.residual, t.weight, t.bias, t.y, t.s, t.mean, t.rstd, shape, eps);
    });
  }
  return {t.y, t.s, t.mean, t.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd_cpu(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& ds_in, const at::Tensor& s_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const at::Tensor& weight_in) {
  const AddLnShape shape = check_add_layernorm_bwd_inputs(dy_in, ds_in, s_in, mean_in, rstd_in, weight_in);
  check_add_layernorm_dtype(kAddLnBwdOp, "s", s_in);
  AddLnBwdTensors t = prepare_add_layernorm_bwd(dy_in, ds_in, s_in, mean_in, rstd_in, weight_in, shape);
  if (shape.rows > 0) {
    dispatch_dtype(t.s.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      run_bwd<T>(t.dy, t.ds, t.s, t.mean, t.rstd, t.weight, t.dx, t.dweight, t.dbias, shape);
    });
  }
  return {t.dx, t.dweight, t.dbias};
}

}  // namespace
}  // namespace cpu
}  // namespace flash

TORCH_LIBRARY_IMPL(flash_attn, CPU, m) {
  m.impl("add_layernorm_fwd", &flash::cpu::add_layernorm_fwd_cpu);
  m.impl("add_layernorm_bwd", &flash::cpu::add_layernorm_bwd_cpu);
}
