// Merge of the split-KV partial results (flash_fwd_split_kernel.cuh) into out and lse, and its
// launcher run_fwd_merge. Plain CUDA: no torch headers.
//
// Per row (b, h, i) with partials (O_s, lse_s), s < num_splits (lse_s = -inf: split s saw no key):
//   M = max_s lse_s;  w_s = exp(lse_s - M);  W = sum_s w_s
//   out = sum_s w_s O_s / W  (in the element type),  lse = M + ln W.
// A row whose splits all saw no key (M = -inf) gets out = 0 and lse = +inf, the convention of the
// one-pass kernel. Threads: kHeadDim / 4 per row, each merging four consecutive columns.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flash_params.h"
#include "flash_utils.cuh"

namespace flash {

template <int kHeadDim>
struct MergeTraits {
  static constexpr int kVecPerRow = kHeadDim / 4;  // float4 columns per row
  static constexpr int kRowsPerBlock = kVecPerRow >= 128 ? 1 : 128 / kVecPerRow;
  static constexpr int kNThreads = kRowsPerBlock * kVecPerRow;
  static_assert(kHeadDim % 4 == 0, "rows are merged in float4 columns");
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(MergeTraits<kHeadDim>::kNThreads)
    flash_fwd_merge_kernel(const FwdParams params) {
  using ET = ElemTraits<Element>;
  using Traits = MergeTraits<kHeadDim>;
  constexpr float kNegInf = -__builtin_huge_valf();
  constexpr float kPosInf = __builtin_huge_valf();
  constexpr float kLog2e = 1.4426950408889634074f;
  constexpr float kLn2 = 0.69314718055994530942f;

  const int64_t total_rows = static_cast<int64_t>(params.batch) * params.heads_q * params.len_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Traits::kRowsPerBlock + threadIdx.x / Traits::kVecPerRow;
  const int c4 = threadIdx.x % Traits::kVecPerRow;
  if (row >= total_rows) return;
  const int num_splits = params.num_splits;
  const float* lse_part = params.lse_accum + row;  // split s at s * total_rows

  float m = kNegInf;
  for (int s = 0; s < num_splits; ++s) m = fmaxf(m, lse_part[s * total_rows]);

  Element* out = static_cast<Element*>(params.out) + row * kHeadDim + c4 * 4;
  if (m == kNegInf) {
    *reinterpret_cast<uint2*>(out) = make_uint2(0u, 0u);
    if (c4 == 0) params.lse[row] = kPosInf;
    return;
  }

  float w_sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < num_splits; ++s) {
    const float lse_s = lse_part[s * total_rows];
    if (lse_s == kNegInf) continue;  // O_s was not needed, and may be unwritten
    const float w = fast_exp2((lse_s - m) * kLog2e);
    const float4 o = *reinterpret_cast<const float4*>(params.out_accum + (s * total_rows + row) * kHeadDim + c4 * 4);
    w_sum += w;
    acc.x += w * o.x;
    acc.y += w * o.y;
    acc.z += w * o.z;
    acc.w += w * o.w;
  }
  const float inv = 1.f / w_sum;  // w_sum >= 1: the split holding the max has w = 1
  *reinterpret_cast<uint2*>(out) = make_uint2(ET::pack(acc.x * inv, acc.y * inv), ET::pack(acc.z * inv, acc.w * inv));
  if (c4 == 0) params.lse[row] = m + __log2f(w_sum) * kLn2;
}

template <typename Element, int HeadDim>
void run_fwd_merge(const FwdParams& params, cudaStream_t stream) {
  using Traits = MergeTraits<HeadDim>;
  const int64_t total_rows = static_cast<int64_t>(params.batch) * params.heads_q * params.len_q;
  const int64_t blocks = (total_rows + Traits::kRowsPerBlock - 1) / Traits::kRowsPerBlock;
  flash_fwd_merge_kernel<Element, HeadDim><<<static_cast<unsigned>(blocks), Traits::kNThreads, 0, stream>>>(params);
}

}  // namespace flash
