// Split-KV forward kernel ("flash-decoding") and its launcher run_fwd_split. Plain CUDA: no torch
// headers. Tile shapes and shared memory: SplitTraits in kernel_traits.h; the merge of the splits:
// flash_fwd_merge.cuh.
//
// Made for few queries against a long key cache, where (B, Hq, query tiles) blocks alone leave most
// SMs idle. The keys [0, Nk) are cut into params.num_splits ranges of whole kBlockN tiles; one block
// computes 16 packed rows of one (batch b, key/value head h_kv) against the tiles of one split and
// writes, per row, the partial output O_s = softmax-normalised over the split's keys (float32) and
// the partial lse_s = ln sum exp(scores) over those keys (-inf when the split has no visible key).
//
// Packed rows: the query heads of a key/value group read the same K/V, so they share a block. Row
// p of the (b, h_kv) slice is query i = p / group of query head h = h_kv * group + p % group, for
// p < group * Nq. With Nq = 1 and group = 4 one block holds the 4 query heads of the group, and K/V
// tiles are read once per group instead of once per query head.
//
// Grid: one dimension, blocks ordered (m_block fastest, then split, then h_kv, then b).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flash_fwd_kernel.cuh"
#include "flash_fwd_merge.cuh"
#include "flash_launch.h"
#include "flash_params.h"
#include "flash_utils.cuh"
#include "kernel_traits.h"
#include "static_switch.h"

namespace flash {

template <typename Traits, typename Element, bool kIsCausal, bool kHasKpm>
__global__ void __launch_bounds__(Traits::kNThreads) flash_fwd_split_kernel(const FwdParams params) {
  using ET = ElemTraits<Element>;
  using fwd_detail::kLn2;
  using fwd_detail::kNegInf;
  using fwd_detail::TileLoader;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kPitch = Traits::kSmemPitch;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int kWarpN = Traits::kWarpN;
  constexpr int kNFragsS = Traits::kNFragsS;
  constexpr int kNFragsO = Traits::kNFragsO;
  constexpr int kStages = Traits::kStages;
  constexpr int kCpr = Traits::kChunksPerRow;
  constexpr uint32_t kPitchBytes = kPitch * 2;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ float s_warp_max[kNWarps][kBlockM];
  __shared__ float s_warp_sum[kNWarps][kBlockM];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // accumulator rows g and g + 8
  const int t = lane % 4;  // accumulator column pair

  const int group = params.group;
  const int len_q = params.len_q;
  const int len_k = params.len_k;
  const int64_t rows_total = static_cast<int64_t>(group) * len_q;  // packed rows of one (b, h_kv)
  const int num_m_blocks = static_cast<int>((rows_total + kBlockM - 1) / kBlockM);
  int block = blockIdx.x;
  const int m_block = block % num_m_blocks;
  block /= num_m_blocks;
  const int split = block % params.num_splits;
  block /= params.num_splits;
  const int h_kv = block % params.heads_kv;
  const int b = block / params.heads_kv;

  int seqlen_k = len_k;  // L: keys j >= L are invisible
  if (params.seqlens_k != nullptr) seqlen_k = min(max(params.seqlens_k[b], 0), len_k);
  const int diag = seqlen_k - len_q;  // causal: query i sees key j iff j <= i + diag

  const int64_t p0 = static_cast<int64_t>(m_block) * kBlockM;
  const int64_t p_last = min(p0 + kBlockM, rows_total) - 1;
  const int q_first = static_cast<int>(p0 / group);  // smallest and largest query index of the block
  const int q_last = static_cast<int>(p_last / group);

  // Tiles with a visible key for some row of the block, and this split's share of them.
  int n_block_max = (seqlen_k + kBlockN - 1) / kBlockN;
  if (kIsCausal) {
    const int key_end = q_last + diag + 1;  // exclusive bound of the last row
    n_block_max = min(n_block_max, key_end <= 0 ? 0 : (key_end + kBlockN - 1) / kBlockN);
  }
  const int n_tiles = (len_k + kBlockN - 1) / kBlockN;
  const int tiles_per_split = (n_tiles + params.num_splits - 1) / params.num_splits;
  const int n_begin = split * tiles_per_split;
  const int n_end = min(n_begin + tiles_per_split, n_block_max);

  // Partial results of this split: row (b, h, i) of (B, Hq, Nq) at split * B * Hq * Nq.
  const int64_t total_rows = static_cast<int64_t>(params.batch) * params.heads_q * len_q;
  float* lse_part = params.lse_accum + split * total_rows;
  float* o_part = params.out_accum + split * total_rows * kHeadDim;
  auto out_row = [&](int64_t p) -> int64_t {
    const int i = static_cast<int>(p / group);
    const int hg = static_cast<int>(p - static_cast<int64_t>(i) * group);
    return (static_cast<int64_t>(b) * params.heads_q + static_cast<int64_t>(h_kv) * group + hg) * len_q + i;
  };

  if (n_begin >= n_end) {
    // No visible key in this split for any row of the block: lse_s = -inf (the merge skips O_s).
    for (int r = tid; r < kBlockM; r += Traits::kNThreads) {
      if (p0 + r < rows_total) lse_part[out_row(p0 + r)] = kNegInf;
    }
    return;
  }

  // Q: 16 packed rows, each from its own (query head, query) row of q; rows past the end are zero.
  const uint32_t sQ_addr = smem_u32(smem_raw);
  const uint32_t sKV_addr = sQ_addr + Traits::kSmemQBytes;
  {
    const Element* q_batch = static_cast<const Element*>(params.q) + b * params.q_stride.batch;
    for (int c = tid; c < kBlockM * kCpr; c += Traits::kNThreads) {
      const int r = c / kCpr;
      const int col = (c % kCpr) * 8;
      const int64_t p = p0 + r;
      const bool pred = p < rows_total;
      const Element* src = static_cast<const Element*>(params.q);
      if (pred) {
        const int i = static_cast<int>(p / group);
        const int h = h_kv * group + static_cast<int>(p - static_cast<int64_t>(i) * group);
        src = q_batch + h * params.q_stride.head + i * params.q_stride.row + col;
      }
      cp_async_16(sQ_addr + (r * kPitch + col) * 2, src, pred);
    }
  }

  // K/V ring: tile n goes to stage (n - n_begin) % kStages. Rows at or past L are zero-filled and
  // not read (they are masked anyway).
  const Element* k_ptr = static_cast<const Element*>(params.k) + b * params.k_stride.batch +
                         h_kv * params.k_stride.head;
  const Element* v_ptr = static_cast<const Element*>(params.v) + b * params.v_stride.batch +
                         h_kv * params.v_stride.head;
  TileLoader<Traits, kBlockN, Element> k_loader(k_ptr, params.k_stride.row, n_begin * kBlockN, tid);
  TileLoader<Traits, kBlockN, Element> v_loader(v_ptr, params.v_stride.row, n_begin * kBlockN, tid);
  auto load_tile = [&](int stage, int n) {  // the loaders stand at tile n
    const uint32_t sK_stage = sKV_addr + stage * Traits::kSmemStageBytes;
    k_loader.load(sK_stage, seqlen_k - n * kBlockN, params.k);
    v_loader.load(sK_stage + Traits::kSmemKVElems * 2, seqlen_k - n * kBlockN, params.v);
    k_loader.move(1);
    v_loader.move(1);
  };
  // Commit groups: Q with the first tile, then one group per later tile (empty past n_end).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (n_begin + s < n_end) load_tile(s, n_begin + s);
    cp_async_commit();
  }

  // Per-lane ldmatrix offsets (flash_utils.cuh): Q rows 0..15; this warp's keys of a K/V stage.
  const uint32_t sQ_lane = sQ_addr + ((lane % 16) * kPitch + (lane / 16) * 8) * 2;
  const uint32_t k_lane = ((warp * kWarpN + (lane / 16) * 8 + lane % 8) * kPitch + ((lane / 8) % 2) * 8) * 2;
  const uint32_t v_lane = ((warp * kWarpN + ((lane / 8) % 2) * 8 + lane % 8) * kPitch + (lane / 16) * 8) * 2;

  // Exclusive key limit of this thread's rows g and g + 8 (rows past the end keep L: never written).
  int row_limit[2];
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int64_t p = min(p0 + g + hi * 8, p_last);
    row_limit[hi] = seqlen_k;
    if (kIsCausal) row_limit[hi] = min(seqlen_k, static_cast<int>(p / group) + diag + 1);
  }

  float acc_o[kNFragsO][4];
#pragma unroll
  for (int d = 0; d < kNFragsO; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[d][e] = 0.f;
  float row_max[2] = {kNegInf, kNegInf};  // log2 units, scaled
  float row_sum[2] = {0.f, 0.f};          // thread-partial
  const float scale_log2 = params.scale_log2;

  // Key padding: lane l of warp w fetches the byte of key w * kWarpN + l of the next tile one tile
  // ahead; a warp ballot turns the bytes into this warp's bits (bit c = the warp's key c).
  const unsigned char* kpm_row = nullptr;
  unsigned char kpm_next = 0;
  auto fetch_kpm = [&](int n) -> unsigned char {
    const int col = n * kBlockN + warp * kWarpN + lane;
    return (lane < kWarpN && col < len_k) ? __ldg(kpm_row + col) : static_cast<unsigned char>(0);
  };
  if (kHasKpm) {
    kpm_row = reinterpret_cast<const unsigned char*>(params.key_padding_mask) +
              b * params.key_padding_mask_batch_stride;
    kpm_next = fetch_kpm(n_begin);
  }

  int stage = 0;
  for (int n = n_begin; n < n_end; ++n) {
    uint32_t kpm_bits = 0;
    if (kHasKpm) {
      kpm_bits = __ballot_sync(0xffffffffu, kpm_next != 0);
      if (n + 1 < n_end) kpm_next = fetch_kpm(n + 1);
    }

    // Tile n landed, and every warp is done with tile n - 1: its stage takes tile n + kStages - 1.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int n_load = n + kStages - 1;
      if (n_load < n_end) load_tile((stage + kStages - 1) % kStages, n_load);
      cp_async_commit();
    }
    const uint32_t sK_stage = sKV_addr + stage * Traits::kSmemStageBytes;
    const uint32_t sV_stage = sK_stage + Traits::kSmemKVElems * 2;

    // S = Q K^T over this warp's keys.
    float acc_s[kNFragsS][4];
#pragma unroll
    for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Traits::kKStepsQK; ++kk) {
      uint32_t qa[4];
      ldmatrix_x4(qa, sQ_lane + kk * 32);
#pragma unroll
      for (int np = 0; np < kNFragsS / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK_stage + k_lane + np * 16 * kPitchBytes + kk * 32);
        mma_16816<Element>(acc_s[2 * np], qa, kb[0], kb[1]);
        mma_16816<Element>(acc_s[2 * np + 1], qa, kb[2], kb[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[j][e] *= scale_log2;

    // Mask keys >= L, above the causal diagonal, or padded (only tiles that can hold such keys).
    const int tile0 = n * kBlockN;
    const bool need_mask = kHasKpm || (tile0 + kBlockN > seqlen_k) ||
                           (kIsCausal && tile0 + kBlockN > q_first + diag + 1);
    if (need_mask) {
      const int col0 = tile0 + warp * kWarpN;
#pragma unroll
      for (int hi = 0; hi < 2; ++hi)
#pragma unroll
        for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int c = j * 8 + 2 * t + e;  // key within the warp's slice
            bool masked = col0 + c >= row_limit[hi];
            if (kHasKpm) masked = masked || ((kpm_bits >> c) & 1u);
            if (masked) acc_s[j][hi * 2 + e] = kNegInf;
          }
    }

    // Online softmax (as in flash_fwd_kernel): a row whose max is still -inf uses offset 0, so its
    // p and rescale factor are exp2(-inf) = 0.
    uint32_t p_frag[kNFragsS][2];
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      float mx = row_max[hi];
#pragma unroll
      for (int j = 0; j < kNFragsS; ++j) mx = fmaxf(mx, fmaxf(acc_s[j][hi * 2], acc_s[j][hi * 2 + 1]));
      mx = quad_allreduce_max(mx);
      const float offset = (mx == kNegInf) ? 0.f : mx;
      const float alpha = fast_exp2(row_max[hi] - offset);
      row_max[hi] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kNFragsS; ++j) {
        const float p0v = fast_exp2(acc_s[j][hi * 2] - offset);
        const float p1v = fast_exp2(acc_s[j][hi * 2 + 1] - offset);
        sum += p0v + p1v;
        p_frag[j][hi] = ET::pack(p0v, p1v);
      }
      row_sum[hi] = row_sum[hi] * alpha + sum;
#pragma unroll
      for (int d = 0; d < kNFragsO; ++d) {
        acc_o[d][hi * 2] *= alpha;
        acc_o[d][hi * 2 + 1] *= alpha;
      }
    }

    // O += P V over this warp's keys.
#pragma unroll
    for (int kk = 0; kk < Traits::kKStepsPV; ++kk) {
      const uint32_t pa[4] = {p_frag[2 * kk][0], p_frag[2 * kk][1], p_frag[2 * kk + 1][0],
                              p_frag[2 * kk + 1][1]};
#pragma unroll
      for (int np = 0; np < kNFragsO / 2; ++np) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV_stage + v_lane + kk * 16 * kPitchBytes + np * 32);
        mma_16816<Element>(acc_o[2 * np], pa, vb[0], vb[1]);
        mma_16816<Element>(acc_o[2 * np + 1], pa, vb[2], vb[3]);
      }
    }
    stage = (stage + 1) % kStages;
  }

  // Combine the warps. Each warp has (max m_w, sum l_w, unnormalised O_w) per row over its keys:
  // M = max m_w, L = sum l_w 2^(m_w - M), O = sum O_w 2^(m_w - M) / L, lse_s = ln 2 (M + log2 L).
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with sQ, sK, sV: sO overlays them
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const float l = quad_allreduce_sum(row_sum[hi]);
    if (t == 0) {
      s_warp_max[warp][g + hi * 8] = row_max[hi];
      s_warp_sum[warp][g + hi * 8] = l;
    }
  }
  __syncthreads();

  float* sO = reinterpret_cast<float*>(smem_raw);
  float lse_row[2];
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const int r = g + hi * 8;
    float m_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) m_all = fmaxf(m_all, s_warp_max[w][r]);
    const float offset = (m_all == kNegInf) ? 0.f : m_all;
    float l_all = 0.f;
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) l_all += s_warp_sum[w][r] * fast_exp2(s_warp_max[w][r] - offset);
    const bool empty = !(l_all > 0.f);
    const float factor = empty ? 0.f : fast_exp2(row_max[hi] - offset) / l_all;
    lse_row[hi] = empty ? kNegInf : (m_all + __log2f(l_all)) * kLn2;
    float* srow = sO + (warp * kBlockM + r) * Traits::kOPitch + 2 * t;
#pragma unroll
    for (int d = 0; d < kNFragsO; ++d) {
      *reinterpret_cast<float2*>(srow + d * 8) =
          make_float2(acc_o[d][hi * 2] * factor, acc_o[d][hi * 2 + 1] * factor);
    }
  }
  __syncthreads();

  if (warp == 0 && t == 0) {
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int64_t p = p0 + g + hi * 8;
      if (p < rows_total) lse_part[out_row(p)] = lse_row[hi];
    }
  }
  constexpr int kVecPerRow = kHeadDim / 4;
  for (int c = tid; c < kBlockM * kVecPerRow; c += Traits::kNThreads) {
    const int r = c / kVecPerRow;
    const int c4 = c % kVecPerRow;
    const int64_t p = p0 + r;
    if (p >= rows_total) continue;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(sO + (w * kBlockM + r) * Traits::kOPitch + c4 * 4);
      sum.x += x.x;
      sum.y += x.y;
      sum.z += x.z;
      sum.w += x.w;
    }
    *reinterpret_cast<float4*>(o_part + out_row(p) * kHeadDim + c4 * 4) = sum;
  }
}

// Launcher: the split kernel, then the merge into params.out / params.lse. Requirements checked by
// the caller: num_splits >= 2, the grid (ceil(group * Nq / 16) * num_splits * B * Hkv blocks) and
// the merge grid fit in int32, out_accum / lse_accum sized (num_splits, B, Hq, Nq[, D]), and the
// alignment of run_fwd.
template <typename Element, int HeadDim>
void run_fwd_split(const FwdParams& params, cudaStream_t stream) {
  using Traits = typename SplitConfig<HeadDim>::Traits;
  const int64_t m_blocks = (static_cast<int64_t>(params.group) * params.len_q + Traits::kBlockM - 1) /
                           Traits::kBlockM;
  const int64_t blocks = m_blocks * params.num_splits * params.batch * params.heads_kv;
  constexpr int kSmem = Traits::kSmemBytes;
  BOOL_SWITCH(params.is_causal, kIsCausal, [&] {
    BOOL_SWITCH(params.key_padding_mask != nullptr, kHasKpm, [&] {
      auto kernel = &flash_fwd_split_kernel<Traits, Element, kIsCausal, kHasKpm>;
      if (kSmem > 48 * 1024) {
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      }
      kernel<<<static_cast<unsigned>(blocks), Traits::kNThreads, kSmem, stream>>>(params);
    });
  });
  run_fwd_merge<Element, HeadDim>(params, stream);
}

// Resident blocks of the split kernel per SM on the current device (at least 1): the heuristic
// sizes the grid to whole waves of these.
template <typename Element, int HeadDim>
int fwd_split_blocks_per_sm() {
  using Traits = typename SplitConfig<HeadDim>::Traits;
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &flash_fwd_split_kernel<Traits, Element, false, false>;
  if (kSmem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem) != cudaSuccess) {
    (void)cudaGetLastError();  // more shared memory than the device gives a block: the API keeps one pass
    return 1;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, Traits::kNThreads, kSmem) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the caller's launch check must not see this
    return 1;
  }
  return blocks > 0 ? blocks : 1;
}

}  // namespace flash
