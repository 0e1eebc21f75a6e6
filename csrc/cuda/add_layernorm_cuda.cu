// CUDA kernels of the fused residual add + LayerNorm (flash_attn::add_layernorm_fwd / _bwd).
//
// A row of `width` elements is handled by a group of threads: one warp (four rows per 128-thread block)
// or a whole block of 64..512 threads. Two kernel families:
//   - vectorised (width a multiple of 16 bytes' worth of elements, 16-byte aligned pointers, width up to
//     16 elements per thread x 512 threads): 16-byte loads and stores, the row kept in registers, so each
//     input is read once and each output written once;
//   - loop (any width and alignment): scalar accesses, the row re-read from global memory (L1/L2).
// Arithmetic is float32. s = x + residual is rounded to the element type first and the statistics are
// taken over the rounded s (the s the backward reads back). Mean and variance are two-pass over the
// cached row, reduced with warp shuffles and, across warps, through shared memory in a fixed order.
// dweight/dbias: each block accumulates its rows in registers (vectorised) or in its own float32 scratch
// row (loop), writes one partial row, and a second kernel sums the partial rows column by column in a
// fixed order: no atomics, and the result does not depend on scheduling.
// No torch headers: this file compiles with nvcc alone (tests/test_cuda_sources_compile.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "add_layernorm_cuda.h"

namespace flash {
namespace addln {
namespace {

constexpr int kWarpSize = 32;
constexpr int kElemsPerThread = 16;    // row elements one thread holds in the vectorised kernels
constexpr int kMaxThreadsPerRow = 512;  // so the vectorised kernels take rows up to 8192 elements
constexpr int kWarpRowBlock = 128;      // warp-per-row kernels run four rows per block
constexpr int kReduceCols = 32;         // partial-sum reduction: columns per block
constexpr int kReduceSlices = 16;       // partial-sum reduction: row slices per block

// ------------------------------------------------------------------------------ element conversion

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Convert<T>::load(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Convert<T>::store(v);
}

// 16 bytes of elements, moved with one vector load or store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  *reinterpret_cast<Pack<T>*>(p) = pack;
}

// ------------------------------------------------------------------------------------ reductions

// Butterfly sum: every lane ends with the same bits (each step adds the same two values, commuted).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Threads per block of a kernel whose rows have kThreadsPerRow threads.
template <int kThreadsPerRow>
struct Layout {
  static constexpr int kBlock = kThreadsPerRow == kWarpSize ? kWarpRowBlock : kThreadsPerRow;
  static constexpr int kGroups = kBlock / kThreadsPerRow;  // rows a block works on at once
  static constexpr int kWarps = kThreadsPerRow / kWarpSize;  // warps per row
};

// Sum of two values over the threads of one row. A row of one warp uses shuffles only; a wider row
// is the whole block and goes through `smem` (2 * kWarps floats), summed in warp order. Every thread
// of the group gets the same result. Wider rows: every thread of the block must call it.
template <int kThreadsPerRow>
__device__ __forceinline__ float2 row_sum2(float a, float b, float* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  constexpr int kWarps = Layout<kThreadsPerRow>::kWarps;
  if constexpr (kWarps > 1) {
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
      smem[warp] = a;
      smem[kWarps + warp] = b;
    }
    __syncthreads();
    a = 0.0f;
    b = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      a += smem[w];
      b += smem[kWarps + w];
    }
    __syncthreads();  // smem is free again
  }
  return make_float2(a, b);
}

template <int kThreadsPerRow>
__device__ __forceinline__ float row_sum(float a, float* smem) {
  return row_sum2<kThreadsPerRow>(a, 0.0f, smem).x;
}

// ------------------------------------------------------------------------------------ forward

template <typename T, int kThreadsPerRow, bool kVectorized>
__global__ void __launch_bounds__(Layout<kThreadsPerRow>::kBlock, 1) fwd_kernel(const FwdParams p) {
  using L = Layout<kThreadsPerRow>;
  __shared__ float red[2 * L::kWarps];
  const int tid = threadIdx.x % kThreadsPerRow;
  const int group = threadIdx.x / kThreadsPerRow;
  const int64_t width = p.width;
  const float inv_width = 1.0f / static_cast<float>(width);
  const T* __restrict__ x_all = static_cast<const T*>(p.x);
  const T* __restrict__ r_all = static_cast<const T*>(p.residual);
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* y_all = static_cast<T*>(p.y);
  T* s_all = static_cast<T*>(p.s);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * L::kGroups;

  if constexpr (kVectorized) {
    constexpr int kVec = Pack<T>::kSize;
    constexpr int kIters = kElemsPerThread / kVec;
    const int64_t chunks = width / kVec;
    float w[kIters][kVec];
    float b[kIters][kVec];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
      const bool valid = c < chunks;
      Pack<T> wp, bp;
      if (valid) wp = load_pack(weight + c * kVec);
      if (valid && bias != nullptr) bp = load_pack(bias + c * kVec);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        w[it][e] = valid ? to_float(wp.v[e]) : 0.0f;
        b[it][e] = valid && bias != nullptr ? to_float(bp.v[e]) : 0.0f;
      }
    }
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * L::kGroups + group; row < p.rows; row += row_step) {
      const int64_t base = row * width;
      float v[kIters][kVec];
      float sum = 0.0f;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
        if (c < chunks) {
          const Pack<T> xp = load_pack(x_all + base + c * kVec);
          const Pack<T> rp = load_pack(r_all + base + c * kVec);
          Pack<T> sp;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            sp.v[e] = from_float<T>(to_float(xp.v[e]) + to_float(rp.v[e]));
            v[it][e] = to_float(sp.v[e]);
            sum += v[it][e];
          }
          store_pack(s_all + base + c * kVec, sp);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) v[it][e] = 0.0f;
        }
      }
      const float mu = row_sum<kThreadsPerRow>(sum, red) * inv_width;
      float sq = 0.0f;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
        if (c < chunks) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float d = v[it][e] - mu;
            sq += d * d;
          }
        }
      }
      const float rs = rsqrtf(row_sum<kThreadsPerRow>(sq, red) * inv_width + p.eps);
      if (tid == 0) {
        p.mean[row] = mu;
        p.rstd[row] = rs;
      }
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
        if (c < chunks) {
          Pack<T> yp;
#pragma unroll
          for (int e = 0; e < kVec; ++e) yp.v[e] = from_float<T>((v[it][e] - mu) * rs * w[it][e] + b[it][e]);
          store_pack(y_all + base + c * kVec, yp);
        }
      }
    }
  } else {
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * L::kGroups + group; row < p.rows; row += row_step) {
      const T* __restrict__ x = x_all + row * width;
      const T* __restrict__ r = r_all + row * width;
      T* s = s_all + row * width;  // written, then read back by the same thread
      T* y = y_all + row * width;
      float sum = 0.0f;
      for (int64_t j = tid; j < width; j += kThreadsPerRow) {
        const T t = from_float<T>(to_float(x[j]) + to_float(r[j]));
        s[j] = t;
        sum += to_float(t);
      }
      const float mu = row_sum<kThreadsPerRow>(sum, red) * inv_width;
      float sq = 0.0f;
      for (int64_t j = tid; j < width; j += kThreadsPerRow) {
        const float d = to_float(s[j]) - mu;
        sq += d * d;
      }
      const float rs = rsqrtf(row_sum<kThreadsPerRow>(sq, red) * inv_width + p.eps);
      if (tid == 0) {
        p.mean[row] = mu;
        p.rstd[row] = rs;
      }
      for (int64_t j = tid; j < width; j += kThreadsPerRow) {
        const float bj = bias != nullptr ? to_float(bias[j]) : 0.0f;
        y[j] = from_float<T>((to_float(s[j]) - mu) * rs * to_float(weight[j]) + bj);
      }
    }
  }
}

// ------------------------------------------------------------------------------------ backward
//   xhat = (s - mean) * rstd, g = dy * weight,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds,  dweight = sum_rows dy * xhat,  dbias = sum_rows dy.

template <typename T, int kThreadsPerRow, bool kVectorized>
__global__ void __launch_bounds__(Layout<kThreadsPerRow>::kBlock, 1)
    bwd_kernel(const BwdParams p, const int64_t partial_rows) {
  using L = Layout<kThreadsPerRow>;
  __shared__ float red[2 * L::kWarps];
  const int tid = threadIdx.x % kThreadsPerRow;
  const int group = threadIdx.x / kThreadsPerRow;
  const int64_t width = p.width;
  const float inv_width = 1.0f / static_cast<float>(width);
  const T* __restrict__ dy_all = static_cast<const T*>(p.dy);
  const T* __restrict__ ds_all = static_cast<const T*>(p.ds);
  const T* __restrict__ s_all = static_cast<const T*>(p.s);
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  T* __restrict__ dx_all = static_cast<T*>(p.dx);
  float* dweight_part = p.partials;
  float* dbias_part = p.partials + partial_rows * width;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * L::kGroups;

  if constexpr (kVectorized) {
    constexpr int kVec = Pack<T>::kSize;
    constexpr int kIters = kElemsPerThread / kVec;
    const int64_t chunks = width / kVec;
    float w[kIters][kVec];
    float dw[kIters][kVec];
    float db[kIters][kVec];
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
      Pack<T> wp;
      if (c < chunks) wp = load_pack(weight + c * kVec);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        w[it][e] = c < chunks ? to_float(wp.v[e]) : 0.0f;
        dw[it][e] = 0.0f;
        db[it][e] = 0.0f;
      }
    }
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * L::kGroups + group; row < p.rows; row += row_step) {
      const int64_t base = row * width;
      const float mu = p.mean[row];
      const float rs = p.rstd[row];
      float xhat[kIters][kVec];
      float g[kIters][kVec];
      float sum_g = 0.0f;
      float sum_gx = 0.0f;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
        if (c < chunks) {
          const Pack<T> sp = load_pack(s_all + base + c * kVec);
          const Pack<T> dyp = load_pack(dy_all + base + c * kVec);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float xh = (to_float(sp.v[e]) - mu) * rs;
            const float d = to_float(dyp.v[e]);
            const float gj = __fmul_rn(d, w[it][e]);  // rounded, never fused into the g - mean(g) below
            xhat[it][e] = xh;
            g[it][e] = gj;
            sum_g += gj;
            sum_gx += gj * xh;
            dw[it][e] += d * xh;
            db[it][e] += d;
          }
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            xhat[it][e] = 0.0f;
            g[it][e] = 0.0f;
          }
        }
      }
      const float2 sums = row_sum2<kThreadsPerRow>(sum_g, sum_gx, red);
      const float c_g = sums.x * inv_width;
      const float c_gx = sums.y * inv_width;
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
        if (c < chunks) {
          Pack<T> dxp;
          if (ds_all != nullptr) {
            const Pack<T> dsp = load_pack(ds_all + base + c * kVec);
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              dxp.v[e] = from_float<T>(rs * (g[it][e] - c_g - xhat[it][e] * c_gx) + to_float(dsp.v[e]));
            }
          } else {
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              dxp.v[e] = from_float<T>(rs * (g[it][e] - c_g - xhat[it][e] * c_gx));
            }
          }
          store_pack(dx_all + base + c * kVec, dxp);
        }
      }
    }
    // One partial row per block (partial_rows == gridDim.x).
    float* out_w = dweight_part + static_cast<int64_t>(blockIdx.x) * width;
    float* out_b = dbias_part + static_cast<int64_t>(blockIdx.x) * width;
    if constexpr (L::kGroups == 1) {
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
        if (c < chunks) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            out_w[c * kVec + e] = dw[it][e];
            out_b[c * kVec + e] = db[it][e];
          }
        }
      }
    } else {
      // The block's warps (one row group each) add up in shared memory, in warp order.
      constexpr int kMaxWidth = kThreadsPerRow * kElemsPerThread;
      __shared__ float combine[2][L::kGroups][kMaxWidth];
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + tid;
        if (c < chunks) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            combine[0][group][c * kVec + e] = dw[it][e];
            combine[1][group][c * kVec + e] = db[it][e];
          }
        }
      }
      __syncthreads();
      for (int64_t col = threadIdx.x; col < width; col += L::kBlock) {
        float a = 0.0f;
        float b = 0.0f;
#pragma unroll
        for (int k = 0; k < L::kGroups; ++k) {
          a += combine[0][k][col];
          b += combine[1][k][col];
        }
        out_w[col] = a;
        out_b[col] = b;
      }
    }
  } else {
    // One float32 scratch row per row group (partial_rows == gridDim.x * kGroups); column j is only ever
    // touched by thread j % kThreadsPerRow of the group.
    const int64_t prow = static_cast<int64_t>(blockIdx.x) * L::kGroups + group;
    float* pw = dweight_part + prow * width;
    float* pb = dbias_part + prow * width;
    for (int64_t j = tid; j < width; j += kThreadsPerRow) {
      pw[j] = 0.0f;
      pb[j] = 0.0f;
    }
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * L::kGroups + group; row < p.rows; row += row_step) {
      const T* __restrict__ s = s_all + row * width;
      const T* __restrict__ dy = dy_all + row * width;
      T* __restrict__ dx = dx_all + row * width;
      const float mu = p.mean[row];
      const float rs = p.rstd[row];
      float sum_g = 0.0f;
      float sum_gx = 0.0f;
      for (int64_t j = tid; j < width; j += kThreadsPerRow) {
        const float xh = (to_float(s[j]) - mu) * rs;
        const float d = to_float(dy[j]);
        const float gj = d * to_float(weight[j]);
        sum_g += gj;
        sum_gx += gj * xh;
        pw[j] += d * xh;
        pb[j] += d;
      }
      const float2 sums = row_sum2<kThreadsPerRow>(sum_g, sum_gx, red);
      const float c_g = sums.x * inv_width;
      const float c_gx = sums.y * inv_width;
      for (int64_t j = tid; j < width; j += kThreadsPerRow) {
        const float xh = (to_float(s[j]) - mu) * rs;
        const float gj = __fmul_rn(to_float(dy[j]), to_float(weight[j]));  // see the vector path
        float v = rs * (gj - c_g - xh * c_gx);
        if (ds_all != nullptr) v += to_float(ds_all[row * width + j]);
        dx[j] = from_float<T>(v);
      }
    }
  }
}

// dweight[j] = sum over partial rows r of partials[0, r, j]; dbias from partials[1]. A block takes
// kReduceCols columns; its kReduceSlices thread rows take every kReduceSlices-th partial row, then the
// slices are added in order.
template <typename T>
__global__ void __launch_bounds__(kReduceCols* kReduceSlices)
    reduce_partials_kernel(const float* __restrict__ partials, const int64_t partial_rows, const int64_t width,
                           T* __restrict__ dweight, T* __restrict__ dbias) {
  __shared__ float sw[kReduceSlices][kReduceCols + 1];
  __shared__ float sb[kReduceSlices][kReduceCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  float a = 0.0f;
  float b = 0.0f;
  if (col < width) {
    for (int64_t r = threadIdx.y; r < partial_rows; r += kReduceSlices) {
      a += partials[r * width + col];
      b += partials[(partial_rows + r) * width + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && col < width) {
    float ta = 0.0f;
    float tb = 0.0f;
#pragma unroll
    for (int k = 0; k < kReduceSlices; ++k) {
      ta += sw[k][threadIdx.x];
      tb += sb[k][threadIdx.x];
    }
    dweight[col] = from_float<T>(ta);
    dbias[col] = from_float<T>(tb);
  }
}

// ------------------------------------------------------------------------------------ host side

template <typename T>
constexpr int pack_size() {
  return 16 / static_cast<int>(sizeof(T));
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads per row of the vectorised kernels for this width, or 0 when they can't take it.
template <typename T>
int vectorized_threads_per_row(int64_t width, std::initializer_list<const void*> pointers) {
  if (width % pack_size<T>() != 0 || width > static_cast<int64_t>(kMaxThreadsPerRow) * kElemsPerThread) return 0;
  for (const void* p : pointers) {
    if (!aligned16(p)) return 0;
  }
  int threads = kWarpSize;
  while (static_cast<int64_t>(threads) * kElemsPerThread < width) threads *= 2;
  return threads;
}

int loop_threads_per_row(int64_t width) { return width <= 1024 ? kWarpSize : 256; }

// Calls fn(T{}) with the element type of `dtype`.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
  }
}

template <int kThreads>
using Threads = std::integral_constant<int, kThreads>;
template <bool kVec>
using Vectorized = std::integral_constant<bool, kVec>;

// Calls fn(Vectorized<v>{}, Threads<t>{}) for a supported (vectorized, threads per row) pair.
template <typename Fn>
void dispatch_config(bool vectorized, int threads_per_row, Fn&& fn) {
  if (vectorized) {
    switch (threads_per_row) {
      case 32: fn(Vectorized<true>{}, Threads<32>{}); break;
      case 64: fn(Vectorized<true>{}, Threads<64>{}); break;
      case 128: fn(Vectorized<true>{}, Threads<128>{}); break;
      case 256: fn(Vectorized<true>{}, Threads<256>{}); break;
      default: fn(Vectorized<true>{}, Threads<512>{}); break;
    }
  } else if (threads_per_row == kWarpSize) {
    fn(Vectorized<false>{}, Threads<32>{});
  } else {
    fn(Vectorized<false>{}, Threads<256>{});
  }
}

// Blocks for a grid-stride kernel: enough for every row group, at most what fits on the device at once.
template <typename Kernel>
int64_t grid_size(Kernel kernel, int block, int num_sms, int64_t row_groups) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0) != cudaSuccess || per_sm < 1) {
    (void)cudaGetLastError();  // not a launch failure: fall back to one block per multiprocessor
    per_sm = 1;
  }
  const int64_t resident = static_cast<int64_t>(per_sm) * std::max(num_sms, 1);
  return std::max<int64_t>(1, std::min(row_groups, resident));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void run_fwd(const FwdParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec_threads =
        vectorized_threads_per_row<T>(p.width, {p.x, p.residual, p.weight, p.bias, p.y, p.s});
    const bool vectorized = vec_threads > 0;
    const int threads = vectorized ? vec_threads : loop_threads_per_row(p.width);
    dispatch_config(vectorized, threads, [&](auto vec, auto tpr) {
      constexpr int kThreadsPerRow = decltype(tpr)::value;
      using L = Layout<kThreadsPerRow>;
      const auto kernel = fwd_kernel<T, kThreadsPerRow, decltype(vec)::value>;
      const int64_t grid = grid_size(kernel, L::kBlock, p.num_sms, ceil_div(p.rows, L::kGroups));
      kernel<<<static_cast<unsigned>(grid), L::kBlock, 0, stream>>>(p);
    });
  });
}

BwdPlan plan_bwd(const BwdParams& p) {
  BwdPlan plan{};
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec_threads = vectorized_threads_per_row<T>(p.width, {p.dy, p.ds, p.s, p.weight, p.dx});
    plan.vectorized = vec_threads > 0;
    plan.threads_per_row = plan.vectorized ? vec_threads : loop_threads_per_row(p.width);
    dispatch_config(plan.vectorized, plan.threads_per_row, [&](auto vec, auto tpr) {
      constexpr int kThreadsPerRow = decltype(tpr)::value;
      using L = Layout<kThreadsPerRow>;
      const auto kernel = bwd_kernel<T, kThreadsPerRow, decltype(vec)::value>;
      plan.grid = grid_size(kernel, L::kBlock, p.num_sms, ceil_div(p.rows, L::kGroups));
      // Vectorised: the block's row groups combine in shared memory; loop: one scratch row per group.
      plan.partial_rows = decltype(vec)::value ? plan.grid : plan.grid * L::kGroups;
    });
  });
  return plan;
}

void run_bwd(const BwdParams& p, const BwdPlan& plan, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_config(plan.vectorized, plan.threads_per_row, [&](auto vec, auto tpr) {
      constexpr int kThreadsPerRow = decltype(tpr)::value;
      using L = Layout<kThreadsPerRow>;
      bwd_kernel<T, kThreadsPerRow, decltype(vec)::value>
          <<<static_cast<unsigned>(plan.grid), L::kBlock, 0, stream>>>(p, plan.partial_rows);
    });
    const dim3 block(kReduceCols, kReduceSlices);
    const auto grid = static_cast<unsigned>(ceil_div(p.width, kReduceCols));
    reduce_partials_kernel<T><<<grid, block, 0, stream>>>(p.partials, plan.partial_rows, p.width,
                                                          static_cast<T*>(p.dweight), static_cast<T*>(p.dbias));
  });
}

}  // namespace addln
}  // namespace flash
