// FlashAttention-2 forward kernel (mma.sync m16n8k16, fp32 accumulate) and its launcher run_fwd.
// Plain CUDA: no torch headers. Tile shapes and the shared memory layout: kernel_traits.h;
// fragment layouts: flash_utils.cuh.
//
// One block: kBlockM query rows of one (batch b, query head h). K/V tiles of kBlockN keys are
// visited from the last visible one down to the first (tiles needing an element mask come first).
// Per tile: S = Q K^T (scaled to log2 units), mask, online softmax in fp32 (running max m and
// thread-partial row sums l), P rounded to the element type in registers and used directly as
// the A operand of O += P V. At the end O / l is written as the element type and
// lse = ln2 * (m + log2 l); a row without any visible key gets O = 0 and lse = +inf.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "flash_fwd_common.cuh"
#include "flash_launch.h"
#include "flash_params.h"
#include "flash_utils.cuh"
#include "kernel_traits.h"

namespace flash {

namespace fwd_detail {

// Asynchronous copies of [kRows][kHeadDim] tiles of one (batch, head) slice from global memory
// (row stride in elements, 16-byte aligned) to padded shared memory. Each row of 16-byte chunks
// is split over kThreadsPerRow threads: thread x of a row copies chunks x, x + kThreadsPerRow, ...
// (kChunksPerThread of them, so each instruction of a warp reads whole 32-byte sectors); a
// thread keeps its columns and walks rows kRowsPerIter apart. Rows at or past rows_valid are
// zero-filled and read nothing. `src` points at this thread's first chunk of the current tile;
// move() shifts it by whole tiles.
template <typename Traits, int kRows, typename Element>
struct TileLoader {
  static constexpr int kCpr = Traits::kChunksPerRow;
  static constexpr int kThreadsPerRow = (kCpr % 3 == 0) ? kCpr / 3 : kCpr;
  static constexpr int kChunksPerThread = kCpr / kThreadsPerRow;
  static constexpr int kRowsPerIter = Traits::kNThreads / kThreadsPerRow;
  static_assert(Traits::kNThreads % kThreadsPerRow == 0, "threads must cover whole rows");
  static_assert(kRows % kRowsPerIter == 0, "tile copy must split evenly");

  const Element* src;
  int64_t row_stride;
  int row;           // this thread's first row within a tile
  uint32_t dst_off;  // byte offset of this thread's first chunk within a smem tile

  __device__ __forceinline__ TileLoader(const Element* slice, int64_t row_stride_, int first_tile_row,
                                        int tid)
      : row_stride(row_stride_) {
    row = tid / kThreadsPerRow;
    const int col = (tid % kThreadsPerRow) * 8;
    src = slice + (first_tile_row + row) * row_stride + col;
    dst_off = (row * Traits::kSmemPitch + col) * 2;
  }

  __device__ __forceinline__ void move(int tiles) { src += tiles * kRows * row_stride; }

  // rows_valid: valid rows of the current tile (>= 1); fallback: any valid global address.
  __device__ __forceinline__ void load(uint32_t smem_tile, int rows_valid, const void* fallback) const {
    const int rows_left = rows_valid - row;
    const Element* p = src;
#pragma unroll
    for (int i = 0; i < kRows / kRowsPerIter; ++i) {
      const bool pred = i * kRowsPerIter < rows_left;
#pragma unroll
      for (int j = 0; j < kChunksPerThread; ++j) {
        constexpr int kJ = kThreadsPerRow * 8;  // elements between a thread's chunks
        cp_async_16(smem_tile + dst_off + (i * kRowsPerIter * Traits::kSmemPitch + j * kJ) * 2,
                    pred ? static_cast<const void*>(p + j * kJ) : fallback, pred);
      }
      p += kRowsPerIter * row_stride;
    }
  }
};

}  // namespace fwd_detail

template <typename Traits, typename Element, bool kIsCausal, bool kHasKpm>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) flash_fwd_kernel(const FwdParams params) {
  using ET = ElemTraits<Element>;
  using namespace fwd_detail;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kPitch = Traits::kSmemPitch;
  constexpr int kMFrags = Traits::kMFrags;
  constexpr int kNFragsS = Traits::kNFragsS;
  constexpr int kNFragsO = Traits::kNFragsO;
  constexpr int kRowsPerWarp = Traits::kRowsPerWarp;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);

  const FwdBlock<Element, kIsCausal, kBlockM, kBlockN, kHeadDim> blk(params);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;  // accumulator row within a 16-row slab (and +8)
  const int t = lane % 4;  // accumulator column pair within an n8 fragment
  const int b = blk.b, row0 = blk.row0, len_q = blk.len_q, len_k = blk.len_k;
  const int seqlen_k = blk.seqlen_k, diag = blk.diag, n_block_max = blk.n_block_max;
  const Element *q_ptr = blk.q_ptr, *k_ptr = blk.k_ptr, *v_ptr = blk.v_ptr;
  Element* o_ptr = blk.o_ptr;
  float* lse_ptr = blk.lse_ptr;
  if (row0 >= len_q) return;
  if (n_block_max <= 0) {
    blk.write_empty_rows(tid, Traits::kNThreads);
    return;
  }

  // Q tile and the first (last visible) K tile.
  int n_block = n_block_max - 1;
  const uint32_t sQ_addr = smem_u32(sQ);
  const uint32_t sK_addr = sQ_addr + Traits::kSmemQElems * 2;
  const uint32_t sV_addr = sK_addr + Traits::kSmemKVElems * 2;
  {
    TileLoader<Traits, kBlockM, Element> q_loader(q_ptr, params.q_stride.row, row0, tid);
    q_loader.load(sQ_addr, len_q - row0, params.q);
  }
  cp_async_commit();
  TileLoader<Traits, kBlockN, Element> k_loader(k_ptr, params.k_stride.row, n_block * kBlockN, tid);
  TileLoader<Traits, kBlockN, Element> v_loader(v_ptr, params.v_stride.row, n_block * kBlockN, tid);
  k_loader.load(sK_addr, len_k - n_block * kBlockN, params.k);
  cp_async_commit();

  // Per-lane ldmatrix addresses (see flash_utils.cuh for the lane -> row/col mapping).
  const int warp_row = warp * kRowsPerWarp;
  const uint32_t sQ_lane = sQ_addr + ((warp_row + lane % 16) * kPitch + (lane / 16) * 8) * 2;
  const uint32_t sK_lane = sK_addr + (((lane / 16) * 8 + lane % 8) * kPitch + ((lane / 8) % 2) * 8) * 2;
  const uint32_t sV_lane = sV_addr + ((((lane / 8) % 2) * 8 + lane % 8) * kPitch + (lane / 16) * 8) * 2;
  constexpr uint32_t kPitchBytes = kPitch * 2;

  float acc_o[kMFrags][kNFragsO][4];
#pragma unroll
  for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
    for (int d = 0; d < kNFragsO; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][d][e] = 0.f;
  // Running max (log2 units, scaled) and thread-partial row sums for rows g and g + 8 of each slab.
  float row_max[kMFrags][2];
  float row_sum[kMFrags][2];
#pragma unroll
  for (int mi = 0; mi < kMFrags; ++mi) {
    row_max[mi][0] = row_max[mi][1] = kNegInf;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }

  const float scale_log2 = params.scale_log2;
  // Key padding: the mask byte of column col0 + tid of the next tile is fetched one tile ahead
  // (kpm_next), turned into a bit per column with a warp ballot (word w covers columns
  // 32 w .. 32 w + 31 of the tile) and published in sMaskBits before the tile's first barrier.
  const unsigned char* kpm_row = nullptr;
  uint32_t* sMaskBits = reinterpret_cast<uint32_t*>(smem_raw + Traits::kSmemMaskOffset);
  unsigned char kpm_next = 0;
  auto fetch_kpm = [&](int col0) -> unsigned char {
    const int col = col0 + tid;
    return (tid < kBlockN && col < len_k) ? __ldg(kpm_row + col) : static_cast<unsigned char>(0);
  };
  if (kHasKpm) {
    kpm_row = reinterpret_cast<const unsigned char*>(params.key_padding_mask) +
              b * params.key_padding_mask_batch_stride;
    kpm_next = fetch_kpm(n_block * kBlockN);
  }

  for (; n_block >= 0; --n_block) {
    const int col0 = n_block * kBlockN;

    if (kHasKpm) {
      const uint32_t bits = __ballot_sync(0xffffffffu, kpm_next != 0);
      if (lane == 0 && warp < kBlockN / 32) sMaskBits[warp] = bits;
    }

    float acc_s[kMFrags][kNFragsS][4];
#pragma unroll
    for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
      for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mi][j][e] = 0.f;

    // K(n) (and Q) landed; every warp is done with V(n + 1): start copying V(n).
    cp_async_wait<0>();
    __syncthreads();
    v_loader.load(sV_addr, len_k - col0, params.v);
    v_loader.move(-1);
    cp_async_commit();

    // S = Q K^T.
#pragma unroll
    for (int kk = 0; kk < Traits::kKStepsQK; ++kk) {
      uint32_t qa[kMFrags][4];
#pragma unroll
      for (int mi = 0; mi < kMFrags; ++mi) {
        ldmatrix_x4(qa[mi], sQ_lane + (mi * 16 * kPitchBytes) + kk * 32);
      }
#pragma unroll
      for (int np = 0; np < kNFragsS / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK_lane + np * 16 * kPitchBytes + kk * 32);
#pragma unroll
        for (int mi = 0; mi < kMFrags; ++mi) {
          mma_16816<Element>(acc_s[mi][2 * np], qa[mi], kb[0], kb[1]);
          mma_16816<Element>(acc_s[mi][2 * np + 1], qa[mi], kb[2], kb[3]);
        }
      }
    }

    // This thread's key padding bits: column 8 j + 2 t + e of the tile is bit (j % 4) * 8 + e of
    // kpm_words[j / 4].
    uint32_t kpm_words[kHasKpm ? kBlockN / 32 : 1];
    if (kHasKpm) {
#pragma unroll
      for (int w = 0; w < kBlockN / 32; ++w) kpm_words[w] = sMaskBits[w] >> (2 * t);
    }
    const bool need_limit_mask =
        (col0 + kBlockN > seqlen_k) || (kIsCausal && col0 + kBlockN - 1 > row0 + diag);
    scale_and_mask<kIsCausal, kHasKpm>(acc_s, scale_log2, col0, row0 + warp_row + g, seqlen_k, diag, t,
                                       kpm_words, need_limit_mask);

    // V(n) landed; every warp is done with K(n): start copying K(n - 1).
    cp_async_wait<0>();
    __syncthreads();
    if (n_block > 0) {
      k_loader.move(-1);
      k_loader.load(sK_addr, len_k - (col0 - kBlockN), params.k);
      cp_async_commit();
      if (kHasKpm) kpm_next = fetch_kpm(col0 - kBlockN);
    }

    uint32_t p_frag[kMFrags][kNFragsS][2];
    online_softmax<ET>(acc_s, acc_o, row_max, row_sum, p_frag);

    // O += P V: P of n8 fragments 2 kk and 2 kk + 1 forms the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < Traits::kKStepsPV; ++kk) {
      uint32_t pa[kMFrags][4];
#pragma unroll
      for (int mi = 0; mi < kMFrags; ++mi) {
        pa[mi][0] = p_frag[mi][2 * kk][0];
        pa[mi][1] = p_frag[mi][2 * kk][1];
        pa[mi][2] = p_frag[mi][2 * kk + 1][0];
        pa[mi][3] = p_frag[mi][2 * kk + 1][1];
      }
#pragma unroll
      for (int np = 0; np < kNFragsO / 2; ++np) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV_lane + kk * 16 * kPitchBytes + np * 32);
#pragma unroll
        for (int mi = 0; mi < kMFrags; ++mi) {
          mma_16816<Element>(acc_o[mi][2 * np], pa[mi], vb[0], vb[1]);
          mma_16816<Element>(acc_o[mi][2 * np + 1], pa[mi], vb[2], vb[3]);
        }
      }
    }
  }

  // Epilogue: normalise, write lse, stage O in this warp's rows of sQ, then 16-byte row stores.
#pragma unroll
  for (int mi = 0; mi < kMFrags; ++mi)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      float lse;
      const float inv = finish_row(row_sum[mi][hi], row_max[mi][hi], &lse);
      const int row_local = warp_row + mi * 16 + g + hi * 8;
      if (t == 0 && row0 + row_local < len_q) lse_ptr[row0 + row_local] = lse;
      Element* srow = sQ + row_local * kPitch + 2 * t;
#pragma unroll
      for (int d = 0; d < kNFragsO; ++d) {
        *reinterpret_cast<uint32_t*>(srow + d * 8) =
            ET::pack(acc_o[mi][d][hi * 2] * inv, acc_o[mi][d][hi * 2 + 1] * inv);
      }
    }
  __syncthreads();
  constexpr int kOutChunks = kBlockM * Traits::kChunksPerRow;
  static_assert(kOutChunks % Traits::kNThreads == 0, "output copy must split evenly");
#pragma unroll
  for (int i = 0; i < kOutChunks / Traits::kNThreads; ++i) {
    const int idx = tid + i * Traits::kNThreads;
    const int r = idx / Traits::kChunksPerRow;
    const int c = idx % Traits::kChunksPerRow;
    if (row0 + r < len_q) {
      *reinterpret_cast<uint4*>(o_ptr + static_cast<int64_t>(row0 + r) * kHeadDim + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + r * kPitch + c * 8);
    }
  }
}

// Launcher (launch_one_pass_fwd in flash_fwd_common.cuh states what the caller checks).
template <typename Element, int HeadDim>
void run_fwd(const FwdParams& params, cudaStream_t stream) {
  using Traits = typename FwdConfig<HeadDim>::Traits;
  launch_one_pass_fwd<Traits>(params, stream, [](auto causal, auto kpm) {
    return &flash_fwd_kernel<Traits, Element, decltype(causal)::value, decltype(kpm)::value>;
  });
}

}  // namespace flash
