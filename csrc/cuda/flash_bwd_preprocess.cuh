// The two small kernels around the main backward kernel:
//   bwd_dot_do_o_kernel:   softmax_d[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] (fp32);
//   bwd_convert_dq_kernel: dq = dq_accum * scale, rounded to the element type.
// Plain CUDA: no torch headers.
#pragma once

#include "flash_params.h"
#include "flash_utils.cuh"

namespace flash {

// kThreadsPerRow threads (a power of two, <= 32) share one row; each reads 8 elements (16 bytes)
// of dout and out per step.
template <typename T, int kHeadDim, int kThreadsPerRow, int kNThreads>
__global__ void __launch_bounds__(kNThreads) bwd_dot_do_o_kernel(const BwdParams params) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kRowsPerBlock = kNThreads / kThreadsPerRow;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int sub = threadIdx.x % kThreadsPerRow;
  const int64_t rows = int64_t(params.batch) * params.heads_q * params.len_q;
  float acc = 0.f;
  if (row < rows) {
    const int i = int(row % params.len_q);
    const int64_t bh = row / params.len_q;
    const int h = int(bh % params.heads_q);
    const int b = int(bh / params.heads_q);
    const T* dout = static_cast<const T*>(params.dout) + b * params.dout_stride.batch +
                    h * params.dout_stride.head + i * params.dout_stride.row;
    const T* out = static_cast<const T*>(params.out_saved) + b * params.out_stride.batch +
                   h * params.out_stride.head + i * params.out_stride.row;
#pragma unroll
    for (int c = sub; c < kChunks; c += kThreadsPerRow) {
      const uint4 x = *reinterpret_cast<const uint4*>(dout + c * 8);
      const uint4 y = *reinterpret_cast<const uint4*>(out + c * 8);
      const uint32_t xs[4] = {x.x, x.y, x.z, x.w};
      const uint32_t ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 a = ElemTraits<T>::unpack(xs[e]);
        const float2 o = ElemTraits<T>::unpack(ys[e]);
        acc = fmaf(a.x, o.x, fmaf(a.y, o.y, acc));
      }
    }
  }
#pragma unroll
  for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (row < rows && sub == 0) params.softmax_d[row] = acc;
}

// The order of dq_accum's elements within a (batch, head): row-major; the mma fragment order of
// flash_bwd_kernel.cuh (kDqFragments there); the warpgroup fragment order of flash_bwd_sm90_kernel.cuh
// (kBulkDq and kVecDq there: per 64-row tile and 64-column half, float4 (w * 8 + j) * 32 + l holds rows
// 16 w + l / 4 and + 8, columns 8 j + 2 (l % 4) and + 1).
enum DqAccumLayout : int { kDqRowMajor = 0, kDqMmaFragments = 1, kDqWgmmaFragments = 2 };

// 4 consecutive elements of dq per thread (the head dim is a multiple of 8, so the total is too);
// dq_accum has dq_accum_rows >= Nq rows per (batch, head) in order kLayout (in the mma fragment order the
// 4 elements are contiguous too; in the warpgroup one they are two pairs of neighbouring lanes).
template <typename T, DqAccumLayout kLayout>
__global__ void bwd_convert_dq_kernel(const BwdParams params, int64_t n4) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n4) return;
  const int D = params.head_dim;
  const int64_t per_head = int64_t(params.len_q) * D / 4;  // float4s of dq per head
  const int64_t bh = idx / per_head;
  float4 a;
  if constexpr (kLayout == kDqMmaFragments) {
    const int64_t in_head = (idx - bh * per_head) * 4;  // element offset of (i, c) in the head's dq
    const int i = int(in_head / D), c = int(in_head % D);
    const int64_t at = (int64_t(i / 16) * (D / 8) + c / 8) * 128 + ((i % 16) / 8) * 64 + (i % 8) * 8 + c % 8;
    a = *reinterpret_cast<const float4*>(params.dq_accum + bh * params.dq_accum_rows * D + at);
  } else if constexpr (kLayout == kDqWgmmaFragments) {
    const int64_t in_head = (idx - bh * per_head) * 4;
    const int i = int(in_head / D), c = int(in_head % D);  // c % 4 == 0
    const int r = i % 64, lane = (r % 8) * 4 + (c % 8) / 2;
    const int64_t at = int64_t(i / 64) * 64 * D + (((c / 64) * 4 + r / 16) * 8 + (c % 64) / 8) * 128 + lane * 4 +
                       ((r % 16) / 8) * 2;
    const float* src = params.dq_accum + bh * params.dq_accum_rows * D + at;
    const float2 lo = *reinterpret_cast<const float2*>(src), hi = *reinterpret_cast<const float2*>(src + 4);
    a = make_float4(lo.x, lo.y, hi.x, hi.y);
  } else {
    // Row-major: skip the padding rows of the heads before this one.
    const int64_t at = idx + bh * (int64_t(params.dq_accum_rows) - params.len_q) * D / 4;
    a = reinterpret_cast<const float4*>(params.dq_accum)[at];
  }
  const float s = params.scale;
  uint2 r;
  r.x = ElemTraits<T>::pack(a.x * s, a.y * s);
  r.y = ElemTraits<T>::pack(a.z * s, a.w * s);
  reinterpret_cast<uint2*>(params.dq)[idx] = r;
}

}  // namespace flash
