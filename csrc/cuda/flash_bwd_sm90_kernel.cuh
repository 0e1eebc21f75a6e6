// Hopper backward (sm_90a): the backward of flash_bwd_kernel.cuh with its five matrix products on warpgroup
// MMAs (wgmma.cuh), and its launcher run_bwd_sm90. Head dims 64 and 128, the default at both (flash_bwd_api.cpp).
//
// One block: kBlockN = 128 keys of one (batch, query head), two warpgroups of 64 keys each. K and V stay in
// shared memory, dK and dV in fp32 registers; the block loops over the query tiles of kBlockM queries (64; 128
// at D = 64 by default) that can see its keys (Q and dO double-buffered by bulk tensor copies, lse and softmax_d
// by cp.async; candidates 0-4: all four by cp.async). Per query tile and warpgroup (64 keys x kBlockM queries):
//   S^T  = K Q^T, dP^T = V dO^T             wgmma, all operands K-major in swizzled shared memory;
//   P^T  = exp2(S^T * scale_log2 - lse * log2e), 0 where masked; dS^T = P^T o (dP^T - softmax_d);
//   dV  += P^T dO, dK += dS^T Q             wgmma with A = P^T / dS^T from registers, B = dO / Q MN-major;
//   dS^T (bf16 / fp16) to shared memory, then, after a block barrier,
//   dQ   = dS K                             wgmma with both operands MN-major (transposed on the way in):
//          D = 128: each warpgroup 64 of the 128 columns over all 128 keys; D = 64 with 128-query tiles: each
//          warpgroup 64 of the queries over all 128 keys (with 64-query tiles: all of them over its own 64
//          keys, both warpgroups adding into dq_accum);
//   dQ  -> float4 atomics into dq_accum (fp32 in fragment order; candidates 0-2: float2 ones, row-major), scaled
//          and rounded by bwd_convert_dq_kernel. The default at D = 128, candidate 20, is warp-specialized: a third
//          warpgroup copies Q, dO, lse and softmax_d in and adds dQ from shared memory by bulk reductions, so
//          the two MMA warpgroups (240 registers each, setmaxnreg) issue only products and the softmax; at
//          the end they stage dK and dV in shared memory and write them out in whole rows (as does 21, the
//          default at D = 64).
// Masks as in flash_bwd_kernel.cuh; the defaults, candidates 20 (D = 128) and 21 (D = 64), mask in a pass of
// their own that only partial and diagonal tiles take. 11 and 17-20 issue the products of a tile, then wait for
// them; 1, 2, 6, 9, 12, 14-16, 18 and 21 overlap some of them with the softmax (BwdSm90Traits). Compiled to a trap
// for other targets.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "flash_bwd_preprocess.cuh"
#include "flash_bwd_utils.cuh"
#include "flash_fwd_common.cuh"
#include "flash_launch.h"
#include "flash_params.h"
#include "flash_utils.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace flash {

// Tiles and shared memory of the Hopper backward (all tiles 128-byte swizzled, 1024-byte aligned):
//   sK, sV [kBlockN x D]; sQ, sdO [kQBufs][kBlockM x D]; sdS [kdSStages][kBlockN x kBlockM] (rows = keys);
//   lse, softmax_d [kQBufs][kBlockM] floats; kTmaQdo: one mbarrier per buffer.
// Candidates (kVariant; -DFLASH_BWD_SM90_VARIANT_HDIM64 / _HDIM128 pick them at compile time):
//   0: every product of a query tile issued, then waited for; two block barriers per tile (measured,
//      docs/perf.md v15: D = 128 1.12-1.15x the mma.sync backward, D = 64 0.79-0.87x);
//   1: 0 with S^T and dP^T in two commit groups: P^T is computed while dP^T is in flight (kSplitSdP)
//      (fwd+bwd x 0.99-1.00 / 0.96-0.99 of 0 in one call, v16);
//   2: 1 with dQ of tile m issued after the products of tile m + 1 (under their softmax), from a second dS^T
//      stage: one block barrier per tile (kDeferDq; 32 more live registers) (x 0.99-1.00 / 1.00-1.02 of 0);
//   3: 0 with dQ added by bulk reductions instead of per-thread atomics (kBulkDq): each warpgroup stores its
//      64 x 64 part of dQ to shared memory in fragment order and one of its threads adds it to dq_accum
//      (cp.reduce.async.bulk ... add.f32), which then holds each 64-row tile in that order (convert kernel:
//      kDqWgmmaFragments). In 0's profile the atomics (REDG) held 18 % of the warps' stall samples, 15 % of
//      them waiting for the load / store queue; fwd+bwd x 1.02-1.03 / 0.97-1.00 of 0 (docs/perf.md, v16);
//   4: 0 with dQ added by vector atomics in 3's fragment order (kVecDq): each thread adds its float4 of a
//      fragment with one red.global.add.v4.f32, and the 32 lanes of a warp cover 512 contiguous bytes (0's
//      row-major float2 atomics: 8 rows x 32 bytes). Half the reductions of 0, no shared memory, no barrier
//      (fwd+bwd x 1.07-1.12 / 1.12-1.18 of 0 at D = 128 / 64; docs/perf.md, v17);
//   5: 4 with Q and dO copied by bulk tensor copies (kTmaQdo, tma.cuh): thread 0 issues a query tile's copies
//      once the block barrier says its buffer is free, each buffer on its own mbarrier; no per-thread copy
//      addresses and no proxy fence per tile (lse and softmax_d still by cp.async). Falls back to cp.async when a
//      tensor map of Q or dO cannot be made (run_bwd_sm90). x 1.09-1.12 / 1.13-1.19 of 0;
//   6: 5 with 2's schedule (S^T and dP^T in two commit groups, dQ of tile m issued under the softmax of tile
//      m + 1, one block barrier per tile) (x 0.99-1.05 / 0.99-1.02 of 5);
//   7: 5 without the block barrier at the top of each tile (kMbarQuery): lse and softmax_d complete on the
//      query tile's mbarrier too (cp.async.mbarrier.arrive of the 64 threads that copy them), three Q / dO
//      buffers and two dS^T stages, so that the barrier before dQ (the one left per tile) also says that the
//      buffer and the stage a tile writes are no longer read (by tile m - 2) (x 0.96-1.03 / 0.98-1.04 of 5);
//   8: at D = 64, 5 with 128-query tiles (kWideQuery): S^T and dP^T as m64n128 products (at n64 both operands
//      of these shared-memory products take as many bytes per FLOP as the shared memory delivers), half the
//      block barriers and dQ additions per query; dQ split by query rows, each warpgroup 64 queries over all
//      128 keys. At D = 128 the same as 5 (S^T, dP^T, dK and dV would need 256 registers per thread). fwd+bwd
//      x 1.16-1.23 of 5 at D = 64, 1.09-1.28x the mma.sync backward (docs/perf.md, v18);
//   9: 8 with S^T and dP^T in two commit groups (kSplitSdP, as 1): at D = 64 P^T of 64 x 128 is computed
//      while dP^T is in flight; at D = 128, 5 with kSplitSdP (x 1.00-1.03 of 8 at D = 64, 0.98-1.01 of 5 at
//      D = 128);
//   10: 8 without the block barrier at the top of each tile (7's kMbarQuery with 128-query tiles; 129 arrivals per
//      mbarrier, three Q / dO buffers and two dS^T stages: 192 KB at D = 64); at D = 128 the same as 7
//      (x 0.98-1.00 of 8 at D = 64, 0.99-1.04 of 5 at D = 128);
//   11: 8 (D = 128: 5) with the softmax's column masking in a pass of its own behind a branch, taken on partial
//      and diagonal tiles only, and dS^T after it (kMaskBranch). With the runtime test inside the loop ptxas
//      predicates the masking, and in 8's profile those predicated-off instructions were 28 % of the
//      instructions executed (docs/perf.md, v18). Backward alone x 1.01-1.02 of 8 at D = 64, 1.03-1.06 of 5 at
//      D = 128 (docs/perf.md, v19); the default at D = 128 until 17;
//   12: 11 with S^T and dP^T in two commit groups (9's kSplitSdP). Backward alone x 1.01-1.04 of 8 at D = 64
//      (1.01-1.02 of 11; 12 bytes spilled), at D = 128 equal to 11; the default at D = 64 until 21;
//   13: 11 with the dQ reductions of tile m issued in tile m + 1, after its block barrier and its Q / dO wait
//      (kLateDqAdd). A block barrier orders the thread's earlier global reductions, so ptxas makes every warp
//      wait before it until the LSU has read its reductions' registers (32 KB of dQ per tile and block); in
//      11's profile at D = 128 that wait was 10.7 % of the stall samples, and the barrier behind it 7.4 %
//      (docs/perf.md, v19). Here the wait moves to the wgmma fence of S^T (each warp for its own reductions,
//      no barrier behind it). Not timed: 14, the same change on 12, ran at x 0.97-0.99 of 12 (docs/perf.md, v19),
//      the drain moved onto each warp's own path before S^T;
//   14: 12 with kLateDqAdd (x 0.97-0.99 of 12 at both head dims);
//   15: 12 with 3's dQ by bulk reductions (kBulkDq): each warpgroup stores its 64 x 64 part of dQ to shared memory
//      (16 KB, fragment order) and one of its threads adds it to dq_accum with cp.reduce.async.bulk, so no thread
//      holds registers for the LSU to read before the next block barrier; at D = 64 each warpgroup's part is its
//      64 query rows (x 0.86-0.90 of 12: 64 KB more shared-memory traffic per tile, two warpgroup barriers);
//   16: 6 (dQ of tile m issued under the products of tile m + 1) with 11's masking pass, at both head dims with
//      64-query tiles (x 0.97-1.00 of 11 at D = 128; 48 bytes spilled);
//   17: 11 with warp specialization (kWarpSpec; docs/perf.md, v19's plan): a third warpgroup whose warp 0 copies
//      Q and dO (TMA) and warp 2 lse and softmax_d into a two-buffer ring (full / empty mbarriers), and whose
//      warp 1 adds dQ to dq_accum by bulk reductions from shared memory (dQ full / empty mbarriers); the two
//      MMA warpgroups issue no copy and no global reduction and meet on a named barrier of 256 threads, two dS^T
//      stages. The copy warpgroup gives its registers to them: setmaxnreg 24 / 240. Backward alone x 1.00-1.09
//      of 11 / 12 at D = 128 (two calls), 0.94-1.04 of 12 at D = 64 (slower at 1k queries, faster from 4k)
//      (docs/perf.md, v20); the default at D = 128 until 20;
//   18: 17 with S^T and dP^T in two commit groups (12's kSplitSdP): backward alone x 0.94-1.05 of 12 at D = 64,
//      0.98-1.07 at D = 128, no better than 17 at either;
//   19: 17 whose copy warpgroup starts on the query tiles at once (kEarlyQuery): in 17 it waits at a block
//      barrier until the MMA threads' cp.async copies of K and V have landed, so every block's first Q / dO tile
//      is fetched only after its K and V; here only the MMA warpgroups wait for K and V (their named barrier).
//      For short sequences, where a block walks few query tiles. Backward alone x 1.00-1.02 of 17 at D = 128,
//      1.00-1.03 at D = 64 (docs/perf.md, v21);
//   20: 19 with dK and dV written through shared memory (kSmemEpilogue): staged as bf16 rows in sK and sV once both
//      MMA warpgroups are done with them, then copied out in 16-byte chunks, whole rows per warp, instead of each
//      thread's 4-byte stores over 8 rows. Backward alone x 0.99-1.08 of 17 at D = 128 (1.05-1.08 at 1k and 4k
//      keys, 0.99-1.01 at 16k), 1.09-1.11 of 12; at D = 64 1.00-1.09 of 17 but 0.94-0.97 of 12 (docs/perf.md,
//      v21): the default at D = 128;
//   21: 12 with 20's epilogue (kSmemEpilogue; all 256 threads issue MMAs, so the two barriers are the block's).
//      For D = 64, where 20 runs at 0.94-0.97 of 12 and its epilogue was worth 0.99-1.05 over 19. Backward
//      alone x 1.01-1.05 of 12 at D = 64 (1.05 at 1k keys; docs/perf.md, v21): the default at D = 64.
// kAllowTma = false: the same candidate with every copy by cp.async (the fallback of kTmaQdo).
template <int kHeadDim_, int kVariant_ = 0, bool kAllowTma = true>
struct BwdSm90Traits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kVariant = kVariant_;
  static constexpr bool kSplitSdP =
      kVariant == 1 || kVariant == 2 || kVariant == 6 || kVariant == 9 || kVariant == 12 || kVariant == 14 ||
      kVariant == 15 || kVariant == 16 || kVariant == 18 || kVariant == 21;
  static constexpr bool kDeferDq = kVariant == 2 || kVariant == 6 || kVariant == 16;
  static constexpr bool kBulkDq = kVariant == 3 || kVariant == 15;
  static constexpr bool kVecDq = kVariant >= 4;
  static constexpr bool kTmaQdo = kVariant >= 5 && kAllowTma;
  static constexpr bool kMbarQuery = (kVariant == 7 || kVariant == 10) && kTmaQdo;
  static constexpr bool kWideQuery = kVariant >= 8 && kVariant != 16 && kHeadDim_ == 64;
  static constexpr bool kMaskBranch = kVariant >= 11;
  static constexpr bool kLateDqAdd = kVariant == 13 || kVariant == 14;
  // Without TMA: 17, 19 and 20 run as 11, 18 as 12.
  static constexpr bool kWarpSpec = (kVariant >= 17 && kVariant <= 20) && kTmaQdo;
  static constexpr bool kEarlyQuery = (kVariant == 19 || kVariant == 20) && kWarpSpec;
  static constexpr bool kSmemEpilogue = (kVariant == 20 && kWarpSpec) || kVariant == 21;
  static constexpr int kQBufs = kMbarQuery ? 3 : 2;  // Q, dO, lse and softmax_d buffers
  static constexpr bool kDqFragmentOrder = kBulkDq || kVecDq;  // dq_accum layout kDqWgmmaFragments
  static constexpr int kBlockN = 128;  // keys per block
  static constexpr int kBlockM = kWideQuery ? 128 : 64;  // queries per step
  static constexpr int kMmaThreads = kBlockN / 64 * 128;  // the warpgroups that issue MMAs
  static constexpr int kNThreads = kMmaThreads + (kWarpSpec ? 128 : 0);
  static constexpr int kNFragsS = kBlockM / 8;    // n8 fragments of S^T per thread
  static constexpr int kNFragsKV = kHeadDim / 8;  // of dK and dV
  // dQ: D = 128 splits its columns between the two warpgroups (64 each), D = 64 its keys (kWideQuery: its
  // query rows, 64 each).
  static constexpr bool kDqSplitColumns = kHeadDim == 128;
  static constexpr bool kDqSplitRows = kWideQuery;
  static constexpr int kDqCols = kDqSplitColumns ? 64 : kHeadDim;
  static constexpr int kDqKSteps = (kDqSplitColumns || kDqSplitRows ? kBlockN : 64) / 16;
  static constexpr int kdSStages = kDeferDq || kMbarQuery || kWarpSpec ? 2 : 1;

  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kTiledSBytes = kBlockN * kBlockM * 2;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kTileKVBytes;
  static constexpr int kOffQ = kOffV + kTileKVBytes;
  static constexpr int kOffdO = kOffQ + kQBufs * kTileQBytes;
  static constexpr int kOffdS = kOffdO + kQBufs * kTileQBytes;
  static constexpr int kOffLse = kOffdS + kdSStages * kTiledSBytes;
  static constexpr int kOffDsum = kOffLse + kQBufs * kBlockM * 4;
  static constexpr int kDqPartBytes = 64 * kDqCols * 4;  // one warpgroup's 64 x 64 dQ (fp32), kBulkDq / kWarpSpec
  // kTmaQdo: one mbarrier per Q / dO buffer; kWarpSpec: then one "buffer empty" per buffer, "dQ full", "dQ empty".
  static constexpr int kOffBar = kOffDsum + kQBufs * kBlockM * 4;
  static constexpr int kBarBytes = kWarpSpec ? 8 * (2 * kQBufs + 2) : kTmaQdo ? 8 * kQBufs : 0;
  static constexpr int kOffDq = (kOffBar + kBarBytes + 127) / 128 * 128;
  static constexpr int kSmemBytes = kBulkDq || kWarpSpec ? kOffDq + 2 * kDqPartBytes : kOffBar + kBarBytes;
  using WithoutTma = BwdSm90Traits<kHeadDim, kVariant, false>;

  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma backward: head dim 64 or 128");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one block on sm_90");
  static_assert(kVariant >= 0 && kVariant <= 21, "no wgmma backward variant with this number");
  static_assert(!(kLateDqAdd && (kDeferDq || kBulkDq || kMbarQuery)), "kLateDqAdd: dQ added by atomics after "
                "the barrier at the top of the next tile");
  static_assert(kDqCols == 64 && kBlockM == (kDqSplitRows ? 128 : 64),
                "the fragment order of dq_accum: 64 x 64 per warpgroup and query tile");
  static_assert(kDqAccumRowMultiple % kBlockM == 0, "whole query tiles add into dq_accum");
  static_assert(!(kDqSplitRows && kDeferDq), "kWideQuery: dQ added right after its product");
  static_assert(kOffV % 1024 == 0 && kOffQ % 1024 == 0 && kOffdO % 1024 == 0 && kOffdS % 1024 == 0,
                "swizzled tiles start on 1024-byte boundaries");
};
#ifndef FLASH_BWD_SM90_VARIANT_HDIM64
#define FLASH_BWD_SM90_VARIANT_HDIM64 21
#endif
#ifndef FLASH_BWD_SM90_VARIANT_HDIM128
#define FLASH_BWD_SM90_VARIANT_HDIM128 20
#endif
template <int kHeadDim>
using BwdSm90Config =
    BwdSm90Traits<kHeadDim, kHeadDim == 64 ? FLASH_BWD_SM90_VARIANT_HDIM64 : FLASH_BWD_SM90_VARIANT_HDIM128>;

template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_sm90_kernel(const BwdParams params, const __grid_constant__ sm90::QdoTensorMaps maps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using ET = ElemTraits<T>;
  using namespace sm90;
  using fwd_detail::pack_p;
  constexpr int D = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int NF = Traits::kNFragsS;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr uint32_t kSbo = 8 * 128;            // 8 rows of 128 bytes
  constexpr uint32_t kKVBlock = kBlockN * 128;  // next 64 columns of a K / V tile
  constexpr uint32_t kQBlock = kBlockM * 128;   // next 64 columns of a Q / dO tile

  extern __shared__ __align__(1024) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wg = warp / 4;     // warpgroup: keys [64 wg, 64 wg + 64) of the block
  const int wwarp = warp % 4;  // warp in the warpgroup: its rows 16 wwarp .. 16 wwarp + 15
  const int n_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int Nq = params.len_q, Nk = params.len_k;
  const bool causal = params.is_causal;
  const int n0 = n_block * kBlockN;
  const BwdBlock<T, kBlockM, D> blk(params, b, h, n0);
  const int L = blk.L;
  const int diag = blk.diag;  // causal: query i sees key j iff j <= i + diag
  const int m_begin = blk.m_begin, m_end = blk.m_end;  // the query tiles that can see some key of this block

  // This thread's keys (accumulator rows g and g + 8 of S^T, dK, dV) and their visibility.
  const int j0 = n0 + wg * 64 + wwarp * 16 + g, j1 = j0 + 8;
  bool vis0 = j0 < L, vis1 = j1 < L;
  if (params.key_padding_mask != nullptr) {
    const bool* kpm = params.key_padding_mask + b * params.key_padding_mask_batch_stride;
    if (vis0) vis0 = !kpm[j0];
    if (vis1) vis1 = !kpm[j1];
  }

  const T *gq = blk.q, *gk = blk.k, *gv = blk.v, *gdo = blk.dout;
  const int64_t bh = blk.bh;
  const float* glse = blk.lse;
  const float* gdsum = blk.dsum;
  float* gdq = blk.dq_accum;

  const uint32_t s0 = smem_u32(smem);
  const uint32_t sK = s0 + Traits::kOffK, sV = s0 + Traits::kOffV, sdS = s0 + Traits::kOffdS;
  const float* sLse = reinterpret_cast<const float*>(smem + Traits::kOffLse);
  const float* sDsum = reinterpret_cast<const float*>(smem + Traits::kOffDsum);

  // kTmaQdo: buffer buf's mbarrier; query tile m is use (m - m_begin) / kQBufs of its buffer's barrier. Its
  // arrivals: thread 0's (with the bytes of Q and dO), and kMbarQuery: those of the threads copying lse and
  // softmax_d, once their copies have landed (kWarpSpec: the 32 lanes of the warp that stores them).
  // kWarpSpec: bar_empty + 8 buf: buffer buf read by every MMA thread (kMmaThreads arrivals); bar_dq_full: the
  // tile's dQ in shared memory (kMmaThreads arrivals); bar_dq_empty: read by the bulk reductions (1 arrival).
  const uint32_t bar_qdo = s0 + Traits::kOffBar;
  const uint32_t bar_empty = bar_qdo + 8 * Traits::kQBufs;
  const uint32_t bar_dq_full = bar_empty + 8 * Traits::kQBufs, bar_dq_empty = bar_dq_full + 8;
  if constexpr (Traits::kTmaQdo) {
    if (tid == 0) {
#pragma unroll
      for (int i = 0; i < Traits::kQBufs; ++i)
        mbar_init(bar_qdo + 8 * i, Traits::kMbarQuery ? 1 + kBlockM : Traits::kWarpSpec ? 1 + 32 : 1);
      if constexpr (Traits::kWarpSpec) {
#pragma unroll
        for (int i = 0; i < Traits::kQBufs; ++i) mbar_init(bar_empty + 8 * i, Traits::kMmaThreads);
        mbar_init(bar_dq_full, Traits::kMmaThreads);
        mbar_init(bar_dq_empty, 1);
      }
      fence_mbar_init();
    }
    __syncthreads();
  }
  // Q, dO, lse and softmax_d of query tile m into buffer buf (rows past Nq zero-filled); kTmaQdo: Q and dO
  // by thread 0's bulk tensor copies, 64 columns each.
  auto tma_query_tile = [&](int m0, int buf) {  // one thread
    const uint32_t bar = bar_qdo + 8 * buf;
    mbar_arrive_expect_tx(bar, 2 * Traits::kTileQBytes);
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb) {
      tma_load_4d(s0 + Traits::kOffQ + buf * Traits::kTileQBytes + cb * kQBlock, &maps.q, bar, cb * 64, m0, h, b);
      tma_load_4d(s0 + Traits::kOffdO + buf * Traits::kTileQBytes + cb * kQBlock, &maps.dout, bar, cb * 64, m0, h,
                  b);
    }
  };
  auto load_query_tile = [&](int m, int buf) {
    const int m0 = m * kBlockM;
    if constexpr (Traits::kTmaQdo) {
      if (tid == 0) tma_query_tile(m0, buf);
    } else {
      load_tile<kBlockM, D, kNThreads>(s0 + Traits::kOffQ + buf * Traits::kTileQBytes, gq, params.q_stride.row, m0,
                                       Nq - m0, tid, params.q);
      load_tile<kBlockM, D, kNThreads>(s0 + Traits::kOffdO + buf * Traits::kTileQBytes, gdo, params.dout_stride.row,
                                       m0, Nq - m0, tid, params.dout);
    }
    if (tid < kBlockM) {
      const bool ok = m0 + tid < Nq;
      cp_async_4(s0 + Traits::kOffLse + (buf * kBlockM + tid) * 4, ok ? glse + m0 + tid : glse, ok);
      cp_async_4(s0 + Traits::kOffDsum + (buf * kBlockM + tid) * 4, ok ? gdsum + m0 + tid : gdsum, ok);
      if constexpr (Traits::kMbarQuery) cp_async_mbar_arrive_noinc(bar_qdo + 8 * buf);
    }
  };

  constexpr int kMmaThreads = Traits::kMmaThreads;
  if (!Traits::kWarpSpec || tid < kMmaThreads) {  // kWarpSpec: K and V by the MMA warpgroups
    load_tile<kBlockN, D, kMmaThreads>(sK, gk, params.k_stride.row, n0, Nk - n0, tid, params.k);
    load_tile<kBlockN, D, kMmaThreads>(sV, gv, params.v_stride.row, n0, Nk - n0, tid, params.v);
  }
  if (!Traits::kWarpSpec && m_begin < m_end) load_query_tile(m_begin, 0);
  cp_async_commit();

  float dk[Traits::kNFragsKV][4], dv[Traits::kNFragsKV][4];
#pragma unroll
  for (int j = 0; j < Traits::kNFragsKV; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;

  // This warpgroup's 64 rows of K and V (first column block; the next ones follow at kKVBlock).
  const uint32_t k_wg = sK + wg * 64 * 128, v_wg = sV + wg * 64 * 128;

  // dQ = dS K of the query tile whose dS^T is in stage st: A = dS^T (rows = keys, MN-major), B = K (rows =
  // keys, MN-major). Issued, not committed.
  using DqAcc = float[Traits::kDqCols / 8][4];
  // kDeferDq: the first k-step ignores the accumulator (scale-d 0) instead of zeroing it: registers written
  // while other products are in flight make ptxas wait for them before the issue.
  auto issue_dq = [&](DqAcc& dq, int st) {
    if constexpr (!Traits::kDeferDq) {
#pragma unroll
      for (int j = 0; j < Traits::kDqCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[j][e] = 0.f;
    }
    fence_accumulator(dq);
    wgmma_fence();
    const int key_base = Traits::kDqSplitColumns || Traits::kDqSplitRows ? 0 : wg * 64;
    const uint32_t k_cols = Traits::kDqSplitColumns ? sK + wg * kKVBlock : sK;
    // kDqSplitRows: this warpgroup's 64 queries are the 64-column block wg of dS^T.
    const uint32_t ds_tile = sdS + st * Traits::kTiledSBytes + (Traits::kDqSplitRows ? wg * kKVBlock : 0);
    const uint64_t ds_desc = make_desc(ds_tile, kBlockN * 128, kSbo), k_desc = make_desc(k_cols, kKVBlock, kSbo);
#pragma unroll
    for (int kk = 0; kk < Traits::kDqKSteps; ++kk) {
      const uint32_t rows = (key_base + kk * 16) * 128;
      wgmma_ss<T, Traits::kDqCols, true, true>(dq, desc_add(ds_desc, rows), desc_add(k_desc, rows),
                                                Traits::kDeferDq && kk == 0 ? 0 : 1);
    }
  };
  // dQ rows (queries) 16 wwarp + g and + 8 of this warp into dq_accum (its MMA waited for and its registers
  // fenced by the caller); rows past Nq exist in dq_accum and add zeros.
  //   atomics: dq_accum row-major;
  //   fragment order (kBulkDq, kVecDq): the warpgroup's 64 x 64 part (columns 64 wg.. at D = 128, all 64 at
  //   D = 64) holds float4 (dq[j][0..3]) of lane l and fragment j of warp w at float4 (w * 8 + j) * 32 + l,
  //   from the tile's float m0 * D (+ 4096 for the second half at D = 128). kBulkDq writes it to its shared
  //   buffer in that order and adds the buffer with one bulk reduction; kVecDq adds each float4 itself.
  float* const gdq_thread =
      Traits::kVecDq ? gdq + (Traits::kDqSplitColumns ? wg * 64 * 64 : 0) + (wwarp * 8 * 32 + lane) * 4
                     : gdq + int64_t(wwarp * 16 + g) * D + (Traits::kDqSplitColumns ? wg * 64 : 0) + 2 * t;
  const uint32_t sdq_part = s0 + Traits::kOffDq + wg * Traits::kDqPartBytes;
  const uint32_t sdq_thread = sdq_part + (wwarp * 8 * 32 + lane) * 16;
  auto stage_dq = [&](const DqAcc& dq) {  // this thread's dQ into the warpgroup's part, fragment order
#pragma unroll
    for (int j = 0; j < Traits::kDqCols / 8; ++j)
      st_shared_f32x4(sdq_thread + j * 32 * 16, dq[j][0], dq[j][1], dq[j][2], dq[j][3]);
  };
  auto add_dq = [&](const DqAcc& dq, int row0) {  // row0: the tile's first query
    if constexpr (Traits::kBulkDq) {
      const bool issuer = tid % 128 == 0;
      if (issuer) bulk_wait_read<0>();  // the previous tile's reduction has read the buffer
      warpgroup_barrier(wg);
      stage_dq(dq);
      fence_proxy_async();
      warpgroup_barrier(wg);
      if (issuer) {
        bulk_reduce_add_f32(gdq + int64_t(row0) * D + (Traits::kDqSplitColumns ? wg * 64 * 64 : 0), sdq_part,
                            Traits::kDqPartBytes);
        bulk_commit();
      }
    } else if constexpr (Traits::kVecDq) {
      float* gdq_r = gdq_thread + int64_t(row0) * D;
#pragma unroll
      for (int j = 0; j < Traits::kDqCols / 8; ++j)
        atomic_add_f4(gdq_r + j * 32 * 4, dq[j][0], dq[j][1], dq[j][2], dq[j][3]);
    } else {
      float* gdq_r = gdq_thread + int64_t(row0) * D;
#pragma unroll
      for (int j = 0; j < Traits::kDqCols / 8; ++j) {
        atomic_add_f2(gdq_r + j * 8, dq[j][0], dq[j][1]);
        atomic_add_f2(gdq_r + 8 * D + j * 8, dq[j][2], dq[j][3]);
      }
    }
  };
  auto ds_stage = [](int m) { return Traits::kdSStages == 2 ? m & 1 : 0; };
  DqAcc dq_deferred;  // kDeferDq: dQ of the previous tile, in flight across the next tile's softmax
  DqAcc dq_late;      // kLateDqAdd: dQ of the previous tile, added past the next tile's top barrier
  if constexpr (Traits::kDeferDq) {
    // The stage the first tile's (dropped) dQ reads: zeros, published by the first tile's barrier.
    uint4* stage = reinterpret_cast<uint4*>(smem + Traits::kOffdS + ds_stage(m_begin - 1) * Traits::kTiledSBytes);
    for (int i = tid; i < Traits::kTiledSBytes / 16; i += kNThreads) stage[i] = make_uint4(0, 0, 0, 0);
  }

  if constexpr (Traits::kMbarQuery || (Traits::kWarpSpec && !Traits::kEarlyQuery)) {
    // K and V (cp.async) seen by every thread and the MMAs' proxy; the query tiles come on their mbarriers.
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
  }
  if constexpr (Traits::kWarpSpec) {
    if (wg == kMmaThreads / 128) {  // the copy warpgroup
      setmaxnreg_dec<24>();
      // Warp 0, lane 0: Q and dO of each query tile by TMA into its buffer, once the MMA warpgroups have released
      // the buffer's previous tile; warp 2: lse and softmax_d (zeros past Nq), each lane arriving on the buffer's
      // barrier after its own stores (33 arrivals: these 32 and lane 0's, which carries the bytes of Q and dO);
      // warp 1, lane 0: dQ.
      if (wwarp == 0) {
        if (lane == 0) {
          for (int m = m_begin; m < m_end; ++m) {
            const int k = m - m_begin, buf = k % Traits::kQBufs, use = k / Traits::kQBufs;
            if (use > 0) mbar_wait(bar_empty + 8 * buf, uint32_t(use - 1) & 1u);
            tma_query_tile(m * kBlockM, buf);
          }
        }
      } else if (wwarp == 2) {
        float* lse_buf = reinterpret_cast<float*>(smem + Traits::kOffLse);
        float* dsum_buf = reinterpret_cast<float*>(smem + Traits::kOffDsum);
        for (int m = m_begin; m < m_end; ++m) {
          const int k = m - m_begin, buf = k % Traits::kQBufs, use = k / Traits::kQBufs, m0 = m * kBlockM;
          if (use > 0) mbar_wait(bar_empty + 8 * buf, uint32_t(use - 1) & 1u);
#pragma unroll
          for (int r = lane; r < kBlockM; r += 32) {
            const bool ok = m0 + r < Nq;
            lse_buf[buf * kBlockM + r] = ok ? glse[m0 + r] : 0.f;
            dsum_buf[buf * kBlockM + r] = ok ? gdsum[m0 + r] : 0.f;
          }
          mbar_arrive(bar_qdo + 8 * buf);
        }
      } else if (wwarp == 1 && lane == 0) {
        // dQ of each tile, both warpgroups' 64 x 64 parts, into dq_accum (fragment order) by bulk reductions.
        for (int m = m_begin; m < m_end; ++m) {
          mbar_wait(bar_dq_full, uint32_t(m - m_begin) & 1u);
#pragma unroll
          for (int part = 0; part < 2; ++part)
            bulk_reduce_add_f32(gdq + int64_t(m) * kBlockM * D + part * 64 * 64,
                                s0 + Traits::kOffDq + part * Traits::kDqPartBytes, Traits::kDqPartBytes);
          bulk_commit();
          bulk_wait_read<0>();
          mbar_arrive(bar_dq_empty);
        }
        bulk_wait<0>();
      }
      return;
    }
    if constexpr (Traits::kEarlyQuery) {
      // K and V (the MMA threads' cp.async) seen by both MMA warpgroups and their MMAs' proxy; the copy warpgroup
      // is already on the query tiles.
      cp_async_wait<0>();
      fence_proxy_async();
      mma_warpgroups_barrier<kMmaThreads>();
    }
    setmaxnreg_inc<240>();
  }
  for (int m = m_begin; m < m_end; ++m) {
    const int buf = (m - m_begin) % Traits::kQBufs;
    if constexpr (Traits::kMbarQuery) {
      // Buffer (m + 1) % 3 and dS^T stage m % 2 were last read in tile m - 2, which both warpgroups finished
      // before the dQ barrier of tile m - 1 that this thread has passed.
      if (m + 1 < m_end) load_query_tile(m + 1, (buf + 1) % Traits::kQBufs);
    } else if constexpr (!Traits::kWarpSpec) {  // kWarpSpec: the copy warpgroup fills the buffers
      cp_async_wait<0>();
      // cp.async writes (K and V; Q and dO without kTmaQdo) seen by the MMAs' proxy.
      if (!Traits::kTmaQdo || m == m_begin) fence_proxy_async();
      // Tile m landed everywhere (kTmaQdo: but Q and dO, waited for below); every warpgroup is done with buffer
      // buf ^ 1 and with the dS^T stage of tile m (kDeferDq: and has stored the dS^T of tile m - 1).
      __syncthreads();
      if (m + 1 < m_end) load_query_tile(m + 1, buf ^ 1);
      cp_async_commit();
    }

    const int m0 = m * kBlockM;
    const uint32_t sQ = s0 + Traits::kOffQ + buf * Traits::kTileQBytes;
    const uint32_t sdO = s0 + Traits::kOffdO + buf * Traits::kTileQBytes;
    if constexpr (Traits::kTmaQdo) mbar_wait(bar_qdo + 8 * buf, uint32_t((m - m_begin) / Traits::kQBufs) & 1u);
    if constexpr (Traits::kLateDqAdd) {  // the previous tile's dQ, past this tile's block barrier
      if (m > m_begin) add_dq(dq_late, (m - 1) * kBlockM + (Traits::kDqSplitRows ? wg * 64 : 0));
    }

    // S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries per warpgroup); kSplitSdP: two commit groups;
    // kDeferDq: then dQ of tile m - 1.
    float s[1][NF][4], dp[1][NF][4];
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][j][e] = dp[0][j][e] = 0.f;
    fence_accumulator(s[0]);
    fence_accumulator(dp[0]);
    wgmma_fence();
    const uint64_t k_desc = make_desc(k_wg, 16, kSbo), q_desc = make_desc(sQ, 16, kSbo);
    const uint64_t v_desc = make_desc(v_wg, 16, kSbo), do_desc = make_desc(sdO, 16, kSbo);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk / 4) * kKVBlock + (kk % 4) * 32, q_off = (kk / 4) * kQBlock + (kk % 4) * 32;
      wgmma_ss<T, kBlockM>(s[0], desc_add(k_desc, off), desc_add(q_desc, q_off), 1);
    }
    if constexpr (Traits::kSplitSdP) wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk / 4) * kKVBlock + (kk % 4) * 32, q_off = (kk / 4) * kQBlock + (kk % 4) * 32;
      wgmma_ss<T, kBlockM>(dp[0], desc_add(v_desc, off), desc_add(do_desc, q_off), 1);
    }
    wgmma_commit();
    if constexpr (Traits::kDeferDq) {
      // Issued on every tile (a wgmma under a branch makes ptxas wait for all of them around it); the first
      // tile's reads the zeroed stage and is dropped.
      issue_dq(dq_deferred, ds_stage(m - 1));
      wgmma_commit();
    }
    // Groups still allowed in flight once S^T (then dP^T) has landed.
    constexpr int kAfterDp = Traits::kDeferDq ? 1 : 0;
    constexpr int kAfterS = kAfterDp + (Traits::kSplitSdP ? 1 : 0);
    wgmma_wait<kAfterS>();
    fence_accumulator(s[0]);
    if constexpr (!Traits::kSplitSdP) fence_accumulator(dp[0]);

    // P^T in place of S^T, dS^T in place of dP^T (kSplitSdP: once dP^T has landed, after all of P^T).
    // Columns need masking only on a partial last tile or across the causal diagonal.
    const float* lse = sLse + buf * kBlockM;
    const float* dsum = sDsum + buf * kBlockM;
    const bool col_mask = (m0 + kBlockM > Nq) || (causal && m0 + diag < n0 + kBlockN - 1);
    // kMaskBranch: the column masking in a pass of its own behind a branch, taken on partial and diagonal tiles
    // only, and dS^T after it; otherwise the runtime test inside the loop, which ptxas predicates, so its
    // instructions issue on every tile (28 % of those 8 executed, docs/perf.md v18).
    constexpr bool kDsLater = Traits::kSplitSdP || Traits::kMaskBranch;  // dS^T in the second loop below
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      const int c = j * 8 + 2 * t;  // queries c, c + 1 of the tile
      const float2 l = *reinterpret_cast<const float2*>(lse + c);
      const float2 dd = *reinterpret_cast<const float2*>(dsum + c);
      const float nl0 = -l.x * kLog2e, nl1 = -l.y * kLog2e;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = fast_exp2(fmaf(s[0][j][e], params.scale_log2, (e & 1) ? nl1 : nl0));
        if (!(e < 2 ? vis0 : vis1)) p = 0.f;
        if (!Traits::kMaskBranch && col_mask) {
          const int i = m0 + c + (e & 1), key = e < 2 ? j0 : j1;
          if (i >= Nq || (causal && key > i + diag)) p = 0.f;
        }
        s[0][j][e] = p;
        if constexpr (!kDsLater) dp[0][j][e] = p * (dp[0][j][e] - ((e & 1) ? dd.y : dd.x));
      }
    }
    if constexpr (Traits::kMaskBranch) {
      if (col_mask) {
#pragma unroll
        for (int j = 0; j < NF; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = m0 + j * 8 + 2 * t + (e & 1), key = e < 2 ? j0 : j1;
            if (i >= Nq || (causal && key > i + diag)) s[0][j][e] = 0.f;
          }
      }
    }
    if constexpr (kDsLater) {
      if constexpr (Traits::kSplitSdP) {
        wgmma_wait<kAfterDp>();
        fence_accumulator(dp[0]);
      }
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        const float2 dd = *reinterpret_cast<const float2*>(dsum + j * 8 + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[0][j][e] = s[0][j][e] * (dp[0][j][e] - ((e & 1) ? dd.y : dd.x));
      }
    }
    uint32_t p_frag[1][NF][2], ds_frag[1][NF][2];
    pack_p<ET>(s, p_frag);
    pack_p<ET>(dp, ds_frag);

    // dV += P^T dO and dK += dS^T Q: A from registers (k-step kk = queries 16 kk ..), B MN-major.
    fence_accumulator(dv);
    fence_accumulator(dk);
    wgmma_fence();
    const uint64_t do_mn_desc = make_desc(sdO, kQBlock, kSbo), q_mn_desc = make_desc(sQ, kQBlock, kSbo);
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint32_t pa[4] = {p_frag[0][2 * kk][0], p_frag[0][2 * kk][1], p_frag[0][2 * kk + 1][0],
                              p_frag[0][2 * kk + 1][1]};
      wgmma_rs<T, D>(dv, pa, desc_add(do_mn_desc, kk * 16 * 128), 1);
    }
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      const uint32_t da[4] = {ds_frag[0][2 * kk][0], ds_frag[0][2 * kk][1], ds_frag[0][2 * kk + 1][0],
                              ds_frag[0][2 * kk + 1][1]};
      wgmma_rs<T, D>(dk, da, desc_add(q_mn_desc, kk * 16 * 128), 1);
    }
    wgmma_commit();

    // dS^T to its stage: row = key in the block, 16-byte chunk j = queries 8 j .. 8 j + 7.
    const int ds_off = Traits::kOffdS + ds_stage(m) * Traits::kTiledSBytes;
    const int row = wg * 64 + wwarp * 16 + g;
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      *reinterpret_cast<uint32_t*>(smem + ds_off + swizzled_offset(row, j, kBlockN) + 4 * t) = ds_frag[0][j][0];
      *reinterpret_cast<uint32_t*>(smem + ds_off + swizzled_offset(row + 8, j, kBlockN) + 4 * t) =
          ds_frag[0][j][1];
    }
    fence_proxy_async();
    if constexpr (Traits::kDeferDq) {
      wgmma_wait<1>();  // dQ of tile m - 1 (dV, dK may still run)
      fence_accumulator(dq_deferred);
      if (m > m_begin) add_dq(dq_deferred, m0 - kBlockM);
      wgmma_wait<0>();
      fence_accumulator(dv);
      fence_accumulator(dk);
      fence_operand(p_frag[0]);
      fence_operand(ds_frag[0]);
    } else {
      // dS^T of both warpgroups stored (kWarpSpec: the stage tile m + 1 writes was last read by the dQ of tile
      // m - 1, before this barrier of tile m)
      if constexpr (Traits::kWarpSpec) {
        mma_warpgroups_barrier<kMmaThreads>();
      } else {
        __syncthreads();
      }
      DqAcc dq;
      issue_dq(dq, ds_stage(m));
      wgmma_commit();
      wgmma_wait<0>();  // dV, dK and dQ
      fence_accumulator(dv);
      fence_accumulator(dk);
      fence_accumulator(dq);
      fence_operand(p_frag[0]);
      fence_operand(ds_frag[0]);
      if constexpr (Traits::kWarpSpec) {
        mbar_arrive(bar_empty + 8 * buf);  // Q, dO (dK, dV waited for), lse and softmax_d of the buffer read
        // dQ to shared memory once the previous tile's reductions have read it; the dQ warp adds it.
        if (m > m_begin) mbar_wait(bar_dq_empty, uint32_t(m - m_begin - 1) & 1u);
        stage_dq(dq);
        fence_proxy_async();
        mbar_arrive(bar_dq_full);
      } else if constexpr (Traits::kLateDqAdd) {
#pragma unroll
        for (int j = 0; j < Traits::kDqCols / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) dq_late[j][e] = dq[j][e];
      } else {
        add_dq(dq, Traits::kDqSplitRows ? m0 + wg * 64 : m0);
      }
    }
  }
  if constexpr (Traits::kLateDqAdd) {
    if (m_begin < m_end) add_dq(dq_late, (m_end - 1) * kBlockM + (Traits::kDqSplitRows ? wg * 64 : 0));
  }
  if constexpr (Traits::kDeferDq) {
    if (m_begin < m_end) {
      __syncthreads();  // dS^T of the last tile stored by both warpgroups
      issue_dq(dq_deferred, ds_stage(m_end - 1));
      wgmma_commit();
      wgmma_wait<0>();
      fence_accumulator(dq_deferred);
      add_dq(dq_deferred, (m_end - 1) * kBlockM);
    }
  }

  cp_async_wait<0>();  // a block without query tiles still has its K / V copies in flight
  if constexpr (Traits::kBulkDq) {
    if (tid % 128 == 0) bulk_wait<0>();  // the last dQ reduction done before the block's shared memory goes
  }
  // dK (times scale) and dV of this thread's keys; keys past Nk are not written.
  T* gdk = static_cast<T*>(params.dk) + bh * Nk * D;
  T* gdv = static_cast<T*>(params.dv) + bh * Nk * D;
  if constexpr (Traits::kSmemEpilogue) {
    // Both MMA warpgroups are past their last products (each tile waits for all of its own), so sK and sV are
    // free: the block's dK and dV go there as rows of D elements, 16-byte chunk q of row r at chunk q ^ (r % 8)
    // (the 8 rows of a store instruction on 8 different banks), then out in whole rows.
    mma_warpgroups_barrier<kMmaThreads>();
    const int r0 = j0 - n0;  // this thread's rows r0 and r0 + 8 of the block
    auto row_chunk = [](int r, int q) { return r * D * 2 + ((q ^ (r % 8)) * 16); };
#pragma unroll
    for (int j = 0; j < Traits::kNFragsKV; ++j) {
      const int lo = row_chunk(r0, j) + 4 * t, hi = row_chunk(r0 + 8, j) + 4 * t;
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffK + lo) =
          ET::pack(dk[j][0] * params.scale, dk[j][1] * params.scale);
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffK + hi) =
          ET::pack(dk[j][2] * params.scale, dk[j][3] * params.scale);
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffV + lo) = ET::pack(dv[j][0], dv[j][1]);
      *reinterpret_cast<uint32_t*>(smem + Traits::kOffV + hi) = ET::pack(dv[j][2], dv[j][3]);
    }
    mma_warpgroups_barrier<kMmaThreads>();
    constexpr int kChunksPerRow = D * 2 / 16;
#pragma unroll
    for (int i = tid; i < kBlockN * kChunksPerRow; i += kMmaThreads) {
      const int r = i / kChunksPerRow, q = i % kChunksPerRow;
      if (n0 + r < Nk) {
        const int64_t dst = int64_t(n0 + r) * D + q * 8;
        const int src = row_chunk(r, q);
        *reinterpret_cast<uint4*>(gdk + dst) = *reinterpret_cast<const uint4*>(smem + Traits::kOffK + src);
        *reinterpret_cast<uint4*>(gdv + dst) = *reinterpret_cast<const uint4*>(smem + Traits::kOffV + src);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < Traits::kNFragsKV; ++j) {
      const int c = j * 8 + 2 * t;
      if (j0 < Nk) {
        *reinterpret_cast<uint32_t*>(gdk + int64_t(j0) * D + c) =
            ET::pack(dk[j][0] * params.scale, dk[j][1] * params.scale);
        *reinterpret_cast<uint32_t*>(gdv + int64_t(j0) * D + c) = ET::pack(dv[j][0], dv[j][1]);
      }
      if (j1 < Nk) {
        *reinterpret_cast<uint32_t*>(gdk + int64_t(j1) * D + c) =
            ET::pack(dk[j][2] * params.scale, dk[j][3] * params.scale);
        *reinterpret_cast<uint32_t*>(gdv + int64_t(j1) * D + c) = ET::pack(dv[j][2], dv[j][3]);
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_90a only; never launched on other devices (see the API layer)
#endif
}

// dK, dV and dq_accum on wgmma, then dq from dq_accum (in the candidate's order). softmax_d is computed before
// (run_bwd).
template <typename Traits, typename T>
void launch_bwd_sm90(const BwdParams& params, cudaStream_t stream, const sm90::QdoTensorMaps& maps) {
  auto kernel = flash_bwd_sm90_kernel<Traits, T>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  const dim3 grid((params.len_k + Traits::kBlockN - 1) / Traits::kBlockN, params.heads_q, params.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params, maps);
}

// kTmaQdo tiles fall back to cp.async copies when a tensor map of Q or dO cannot be made (e.g. a stride the
// copy engine cannot address).
template <typename T, int kHeadDim>
void run_bwd_sm90(const BwdParams& params, cudaStream_t stream) {
  using Traits = BwdSm90Config<kHeadDim>;
  sm90::QdoTensorMaps maps{};
  bool mapped = false;
  if constexpr (Traits::kTmaQdo) {
    constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
    mapped = make_tensor_map_4d(&maps.q, params.q, kBf16, params.batch, params.heads_q, params.len_q, kHeadDim,
                                params.q_stride, Traits::kBlockM) &&
             make_tensor_map_4d(&maps.dout, params.dout, kBf16, params.batch, params.heads_q, params.len_q,
                                kHeadDim, params.dout_stride, Traits::kBlockM);
  }
  if (mapped) {
    launch_bwd_sm90<Traits, T>(params, stream, maps);
  } else {
    launch_bwd_sm90<typename Traits::WithoutTma, T>(params, stream, maps);
  }
  const int64_t n4 = int64_t(params.batch) * params.heads_q * params.len_q * kHeadDim / 4;
  constexpr DqAccumLayout kLayout = Traits::kDqFragmentOrder ? kDqWgmmaFragments : kDqRowMajor;
  bwd_convert_dq_kernel<T, kLayout><<<unsigned((n4 + 255) / 256), 256, 0, stream>>>(params, n4);
}

}  // namespace flash
