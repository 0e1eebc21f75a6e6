// What the one-pass forward kernels (mma.sync and wgmma) share: the block's rows, keys and pointers,
// and the score tile's masking and online softmax on the accumulator layout both use: per thread float acc_s[kMFrags][kNFragsS][4], m16 slab mi, n8 fragment
// j, registers (row g: 0, 1; row g + 8: 2, 3) at columns 8 j + 2 t (+1); see flash_utils.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "flash_params.h"
#include "flash_utils.cuh"

namespace flash {
namespace fwd_detail {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kPosInf = __builtin_huge_valf();
constexpr float kLn2 = 0.69314718055994530942f;

// One block's query rows [row0, row0 + kBlockM) of (batch b, query head h): the visible keys, the
// number of key tiles to visit and the pointers of its slices. Causal grids run their query tiles in
// reverse (the last tiles see the most keys; launched first, the grid's last wave holds the shortest).
template <typename Element, bool kIsCausal, int kBlockM, int kBlockN, int kHeadDim>
struct FwdBlock {
  int b, h, row0;
  int len_q, len_k;
  int seqlen_k;     // L: keys j >= L are invisible
  int diag;         // causal: query i sees key j iff j <= i + diag
  int n_block_max;  // key tiles holding at least one visible key for some row of this block
  const Element* q_ptr;
  const Element* k_ptr;
  const Element* v_ptr;
  Element* o_ptr;
  float* lse_ptr;

  // The block of the grid (query tiles, Hq, B); causal grids run their longest rows first.
  __device__ __forceinline__ explicit FwdBlock(const FwdParams& params)
      : FwdBlock(params, kIsCausal ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x), int(blockIdx.y),
                 int(blockIdx.z)) {}

  // Query tile m_block of query head h_ of batch b_ (persistent kernels pick their own).
  __device__ __forceinline__ FwdBlock(const FwdParams& params, int m_block, int h_, int b_) {
    h = h_;
    b = b_;
    len_q = params.len_q;
    len_k = params.len_k;
    seqlen_k = len_k;
    if (params.seqlens_k != nullptr) seqlen_k = min(max(params.seqlens_k[b], 0), len_k);
    diag = seqlen_k - len_q;
    row0 = m_block * kBlockM;
    n_block_max = (seqlen_k + kBlockN - 1) / kBlockN;
    if (kIsCausal) {
      const int key_end = min(row0 + kBlockM, len_q) + diag;  // exclusive bound for the last row
      n_block_max = min(n_block_max, key_end <= 0 ? 0 : (key_end + kBlockN - 1) / kBlockN);
    }
    const int h_kv = h / params.group;
    q_ptr = static_cast<const Element*>(params.q) + b * params.q_stride.batch + h * params.q_stride.head;
    k_ptr = static_cast<const Element*>(params.k) + b * params.k_stride.batch + h_kv * params.k_stride.head;
    v_ptr = static_cast<const Element*>(params.v) + b * params.v_stride.batch + h_kv * params.v_stride.head;
    const int64_t out_row_base = (static_cast<int64_t>(b) * params.heads_q + h) * len_q;
    o_ptr = static_cast<Element*>(params.out) + out_row_base * kHeadDim;
    lse_ptr = params.lse + out_row_base;
  }

  // No key is visible to any row of this block: O = 0, lse = +inf.
  __device__ __forceinline__ void write_empty_rows(int tid, int n_threads) const {
    constexpr int kChunksPerRow = kHeadDim / 8;
    for (int idx = tid; idx < kBlockM * kChunksPerRow; idx += n_threads) {
      const int r = idx / kChunksPerRow;
      const int c = idx % kChunksPerRow;
      if (row0 + r < len_q) {
        *reinterpret_cast<uint4*>(o_ptr + static_cast<int64_t>(row0 + r) * kHeadDim + c * 8) =
            make_uint4(0u, 0u, 0u, 0u);
      }
    }
    for (int r = tid; r < kBlockM; r += n_threads) {
      if (row0 + r < len_q) lse_ptr[row0 + r] = kPosInf;
    }
  }
};

// Scales S to log2 units, then sets -inf where a key is invisible: column col0 + 8 j + 2 t + e of
// row `row_base + 16 mi + 8 hi` is masked when it is >= seqlen_k, above the causal diagonal
// (col > row + diag), or padded (bit (j % 4) * 8 + e of kpm_words[j / 4], already shifted by 2 t).
// need_limit_mask: some column of the tile reaches seqlen_k or the diagonal. kScale = false: mask only
// (the caller scales inside the exponential, see softmax_in_place).
template <bool kIsCausal, bool kHasKpm, int kMFrags, int kNFragsS, bool kScale = true>
__device__ __forceinline__ void scale_and_mask(float (&acc_s)[kMFrags][kNFragsS][4], float scale_log2, int col0,
                                               int row_base, int seqlen_k, int diag, int t,
                                               const uint32_t* kpm_words, bool need_limit_mask) {
  if constexpr (kScale) {
#pragma unroll
    for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
      for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mi][j][e] *= scale_log2;
  }
  if (kHasKpm || need_limit_mask) {
#pragma unroll
    for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int row = row_base + mi * 16 + hi * 8;
        int limit = seqlen_k;  // exclusive
        if (kIsCausal) limit = min(limit, row + diag + 1);
#pragma unroll
        for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = col0 + j * 8 + 2 * t + e;
            bool masked = col >= limit;
            if (kHasKpm) masked = masked || ((kpm_words[j / 4] >> ((j % 4) * 8 + e)) & 1u);
            if (masked) acc_s[mi][j][hi * 2 + e] = kNegInf;
          }
      }
  }
}

// Online softmax of one score tile, in place: updates the running max (log2 units) and the
// thread-partial row sums, turns S into P (fp32, same registers) and returns the rescale factor of
// each row of O in alpha. A row whose running max is still -inf has seen no visible key: its exp offset
// is 0, so every p is exp2(-inf) = 0 and alpha is 0 (never inf - inf).
// kRawScores: S is unscaled (masked with -inf only) and scale_log2 > 0 is applied inside the exponential,
// exp2(s * scale_log2 - max), one FFMA instead of a multiply and a subtraction per score; the row max of
// the raw scores times scale_log2 is the row max of the scaled ones because scale_log2 > 0.
// kEmulateEvery > 0: the exponentials of every kEmulateEvery-th n8 fragment run on the FMA pipe
// (exp2_on_fma), the others on the MUFU unit, to share the work between the two.
template <bool kRawScores = false, int kEmulateEvery = 0, int kMFrags, int kNFragsS>
__device__ __forceinline__ void softmax_in_place(float (&acc_s)[kMFrags][kNFragsS][4], float (&row_max)[kMFrags][2],
                                                 float (&row_sum)[kMFrags][2], float (&alpha)[kMFrags][2],
                                                 float scale_log2 = 1.f) {
#pragma unroll
  for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      float mx = kRawScores ? kNegInf : row_max[mi][hi];
#pragma unroll
      for (int j = 0; j < kNFragsS; ++j) {
        mx = fmaxf(mx, fmaxf(acc_s[mi][j][hi * 2], acc_s[mi][j][hi * 2 + 1]));
      }
      mx = quad_allreduce_max(mx);
      if constexpr (kRawScores) mx = fmaxf(row_max[mi][hi], mx * scale_log2);  // the raw max, scaled
      const float offset = (mx == kNegInf) ? 0.f : mx;
      alpha[mi][hi] = fast_exp2(row_max[mi][hi] - offset);
      row_max[mi][hi] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float s = acc_s[mi][j][hi * 2 + e];
          const float x = kRawScores ? fmaf(s, scale_log2, -offset) : s - offset;
          constexpr int kEvery = kEmulateEvery > 0 ? kEmulateEvery : 1;
          const bool on_fma = kEmulateEvery > 0 && j % kEvery == kEvery - 1;
          acc_s[mi][j][hi * 2 + e] = on_fma ? exp2_on_fma(x) : fast_exp2(x);
          sum += acc_s[mi][j][hi * 2 + e];
        }
      row_sum[mi][hi] = row_sum[mi][hi] * alpha[mi][hi] + sum;
    }
}

// O *= alpha, row by row.
template <int kMFrags, int kNFragsO>
__device__ __forceinline__ void rescale_o(float (&acc_o)[kMFrags][kNFragsO][4], const float (&alpha)[kMFrags][2]) {
#pragma unroll
  for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
    for (int d = 0; d < kNFragsO; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][d][e] *= alpha[mi][e / 2];
}

// P in the element type: p_frag[mi][j][hi] holds columns (2t, 2t+1) of row g + 8 hi of n8 fragment j.
template <typename ET, int kMFrags, int kNFragsS>
__device__ __forceinline__ void pack_p(const float (&acc_s)[kMFrags][kNFragsS][4],
                                       uint32_t (&p_frag)[kMFrags][kNFragsS][2]) {
#pragma unroll
  for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
    for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) p_frag[mi][j][hi] = ET::pack(acc_s[mi][j][hi * 2], acc_s[mi][j][hi * 2 + 1]);
}

// All three for one tile: the step of a kernel that does not overlap the softmax with an MMA of O.
template <typename ET, int kMFrags, int kNFragsS, int kNFragsO>
__device__ __forceinline__ void online_softmax(float (&acc_s)[kMFrags][kNFragsS][4],
                                               float (&acc_o)[kMFrags][kNFragsO][4], float (&row_max)[kMFrags][2],
                                               float (&row_sum)[kMFrags][2],
                                               uint32_t (&p_frag)[kMFrags][kNFragsS][2]) {
  float alpha[kMFrags][2];
  softmax_in_place(acc_s, row_max, row_sum, alpha);
  pack_p<ET>(acc_s, p_frag);
  rescale_o(acc_o, alpha);
}

// The end of a row: 1 / l (0 for a row without any visible key) and its lse (natural log; +inf for such
// a row). `partial_sum` is this thread's part of the row sum.
__device__ __forceinline__ float finish_row(float partial_sum, float row_max, float* lse) {
  const float l = quad_allreduce_sum(partial_sum);
  const bool empty = !(l > 0.f);
  *lse = empty ? kPosInf : (row_max + __log2f(l)) * kLn2;
  return empty ? 0.f : 1.f / l;
}

}  // namespace fwd_detail

// The instantiation of a one-pass forward kernel for the runtime flags of `params`:
// kernel_of(std::bool_constant<kIsCausal>, std::bool_constant<kHasKpm>) names it. Four explicit
// branches, not nested BOOL_SWITCHes: nvcc 13.0 resolves std::bool_constant<kHasKpm> of the inner
// switch's static constexpr to the first branch's value in one of the outer branches (non-causal with
// a key padding mask ran the kernel without the mask); tests/test_cuda_sources_compile.py checks this.
template <typename KernelOf>
auto select_one_pass_kernel(const FwdParams& params, KernelOf kernel_of) {
  using T = std::true_type;
  using F = std::false_type;
  const bool kpm = params.key_padding_mask != nullptr;
  if (params.is_causal) return kpm ? kernel_of(T{}, T{}) : kernel_of(T{}, F{});
  return kpm ? kernel_of(F{}, T{}) : kernel_of(F{}, F{});
}

// Launches a one-pass forward kernel with tiles Traits on `grid` (persistent kernels: their own grid).
template <typename Traits, typename KernelOf, typename... Extra>
void launch_one_pass_fwd_on(const dim3 grid, const FwdParams& params, cudaStream_t stream, KernelOf kernel_of,
                            const Extra&... extra) {
  constexpr int kSmem = Traits::kSmemBytes;
  const auto kernel = select_one_pass_kernel(params, kernel_of);
  if (kSmem > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(params, extra...);
}

// Launches a one-pass forward kernel with tiles Traits on the grid (query tiles, Hq, B).
// Requirements checked by the caller: B, Hq <= 65535, len_q, len_k < 2^31, q/k/v base pointers and
// batch/head/row strides 16-byte aligned.
// Arguments after params (extra) go to the kernel as they are.
template <typename Traits, typename KernelOf, typename... Extra>
void launch_one_pass_fwd(const FwdParams& params, cudaStream_t stream, KernelOf kernel_of, const Extra&... extra) {
  const int num_m_blocks = (params.len_q + Traits::kBlockM - 1) / Traits::kBlockM;
  launch_one_pass_fwd_on<Traits>(dim3(num_m_blocks, params.heads_q, params.batch), params, stream, kernel_of,
                                 extra...);
}

}  // namespace flash
