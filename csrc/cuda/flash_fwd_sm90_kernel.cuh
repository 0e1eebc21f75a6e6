// Hopper forward kernel (sm_90a): the FlashAttention-2 loop of flash_fwd_kernel.cuh with both matrix
// products on warpgroup MMAs (wgmma.cuh) instead of mma.sync, and its launcher run_fwd_sm90.
//
// One block: kBlockM query rows of one (batch, query head), kBlockM / 64 warpgroups of 64 rows. Key
// tiles are visited from the last visible one down to the first, as in the mma.sync kernel. Per tile and
// warpgroup:
//   S (64 x kBlockN) = Q K^T: kKStepsQK wgmma, Q and K from swizzled shared memory (K-major);
//   mask and online softmax on the accumulators (flash_fwd_common.cuh: the layout is mma.sync's);
//   O (64 x D) += P V: kKStepsPV wgmma, P from registers, V from shared memory (MN-major).
// Two schedules (Traits::kOverlap):
//   false: one K and one V tile, two barriers per tile; the copy of V(n) overlaps S = Q K(n)^T, the
//          copy of K(n - 1) overlaps the softmax and O += P V(n); the MMAs wait for each other.
//   true:  2-stage K / V rings, one barrier per tile; S(n) and O += P(n + 1) V(n + 1) are issued
//          together and the softmax of S(n) runs while the second is in flight. With one V buffer
//          (kStagesV = 1) the copy of V(n) waits for P V(n + 1) and lands under S(n - 1): three barriers
//          per tile, cheap with one warpgroup per block.
//   With Traits::kTma the K and V tiles come by bulk tensor copies (tma.cuh) that thread 0 issues once
//   the block barrier says a stage is free, each stage on its own mbarrier; each thread waits for a
//   tile's barrier right before the MMA that reads it. Q still comes by cp.async.
//   With Traits::kLastWarpLoads (two warpgroups, TMA) the key loop has no block barrier: the last warp
//   done with a stage issues the copy of the tile two steps on into it; with Traits::kPingPong the two
//   warpgroups also take turns issuing their MMAs (named barriers 3 and 4), so that one's softmax runs
//   under the other's MMAs; Traits::kEarlyTurn passes the first turn once the last warpgroup's first S is
//   issued, and with Traits::kWgEpilogue each warpgroup writes its rows of O behind a warpgroup barrier.
//   With Traits::kPersistent (on kLastWarpLoads) one block per SM walks several query tiles (TileCursor's
//   order); once a tile's O is staged in a buffer of its own, the block issues the next tile's Q, K and V
//   copies and then writes O out, and the stages' mbarriers carry their phases from tile to tile.
//   With Traits::kWarpSpec (on kPingPong with kTmaStoreO) a producer warpgroup comes first: one of its threads
//   copies every tile (fwd_sm90_produce: Q, K and V by TMA, each buffer with a full and an empty mbarrier), the
//   two computing warpgroups run the ping-pong key loop above on their 240 registers (setmaxnreg) and arrive on
//   a buffer's empty barrier once done with it, and the block walks query tiles as kPersistent does: the next
//   tile's Q, K and V land while this tile's last products and output stores run.
// run_fwd_sm90 launches the head dim's default tiles (FwdSm90Config<D>::Traits) or, for grids the API
// layer finds too small for them, its 64-row small-grid tiles (::SmallGridTraits), or for long key
// sequences its long-key tiles (::LongKeysTraits; 192-row blocks at D = 64).
// Compiled to a trap for other targets; run_fwd_sm90 is only called on sm_90 devices of a build that
// includes sm_90a (FLASH_WITH_SM90A, see flash_fwd_api.cpp).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "flash_fwd_common.cuh"
#include "flash_launch.h"
#include "flash_params.h"
#include "flash_utils.cuh"
#include "kernel_traits.h"
#include "tma.cuh"
#include "wgmma.cuh"

namespace flash {

namespace sm90 {

// Ends the softmax of S(n) before the wait for O += P V(n + 1), so that it runs while that MMA does.
// ptxas schedules a basic block as a whole and puts the wgmma wait early, ahead of register-only math
// that the source places before it: without this the row max, the exponentials and the row sums ran
// after the wait (SASS: scripts/sass_segments.py, docs/perf.md v9). The register fences keep the math
// above this point in the PTX; the branch, never taken (a row sum is never negative), ends the basic block
// so that ptxas keeps it there.
template <int NF>
__device__ __forceinline__ void keep_above_wait(float (&acc_s)[NF][4], float (&row_sum)[1][2], float (&alpha)[1][2]) {
  fence_accumulator(acc_s);
  fence_accumulator(row_sum);
  fence_accumulator(alpha);
  if (row_sum[0][0] < -1.f) __trap();
}

// x broadcast from lane 0 (x is the same in every lane): ptxas takes the result for warp-uniform and may keep it,
// and what is computed from it, on the uniform datapath (Traits::kUniformKeyIndex).
__device__ __forceinline__ int uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

// Ping-pong turns of kNWg warpgroups (Traits::kPingPong) in round robin, on named barriers 1 + kNWg + wg
// (after the warpgroup barriers 1 .. kNWg), 256 threads each: warpgroup wg waits on its barrier for its turn,
// then passes the turn with a non-blocking arrive on the next one's. Turns go round in order, so a barrier
// never holds two arrivals of one warpgroup.
template <int kNWg>
__device__ __forceinline__ void wait_turn(int wg) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(1 + kNWg + wg) : "memory");
}
template <int kNWg>
__device__ __forceinline__ void pass_turn(int wg) {
  // kNWg == 2 keeps the form of the measured two-warpgroup kernel ((wg + 1) % 2 compiles to other code).
  const int next = kNWg == 2 ? 1 - wg : (wg + 1 == kNWg ? 0 : wg + 1);
  asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + kNWg + next) : "memory");
}

// kPersistent: a block's place in the order of query tiles. Unit (b * heads_q + h) * units_per_head + p is the
// query tiles num_m - 1 - p and p of head h of batch b (`second` picks p), so that under a causal mask every unit
// holds the same work (the longest tile with the shortest), and the units of a head are neighbours (blocks that
// run at the same time share its K and V in L2). A block walks units blockIdx.x, + gridDim.x, ... (grid: one
// block per SM), counting (p, h, b) on with carries instead of divisions.
struct TileCursor {
  int p = 0, h = 0, b = 0;
  bool second = false;
  __device__ __forceinline__ int m_block(int num_m) const { return second ? p : num_m - 1 - p; }
  __device__ __forceinline__ void carry(const FwdParams& params, int units_per_head) {
    while (p >= units_per_head) {
      p -= units_per_head;
      if (++h == params.heads_q) {
        h = 0;
        ++b;
      }
    }
  }
  __device__ __forceinline__ void first(const FwdParams& params, int units_per_head) {
    p = int(blockIdx.x);
    carry(params, units_per_head);
  }
  // The unit's other tile, else the first tile of the block's next unit.
  __device__ __forceinline__ void advance(const FwdParams& params, int num_m, int units_per_head) {
    if (!second && p != num_m - 1 - p) {
      second = true;
    } else {
      second = false;
      p += int(gridDim.x);
      carry(params, units_per_head);
    }
  }
};

// A persistent block's state from one query tile to the next (Traits::kPersistent).
struct PersistentState {
  TileCursor cursor;
  uint32_t parity = 0;      // bit s: the phase parity of K stage s's mbarrier at the tile's start; bit 2 + s: V's;
                            // kWarpSpec: bit 4, Q's
  bool prefetched = false;  // the tile's Q, K and V copies were issued by the tile before
  uint32_t qbuf = 0;        // Traits::kPrefetchQ: the Q buffer of the tile
};

// The stages' phase parities (PersistentState::parity) after a tile of key tiles n_last .. 0: each stage s held the
// tiles n <= n_last with n % 2 == s, one phase of its K and its V barrier each.
__device__ __forceinline__ uint32_t next_parity(uint32_t parity, int n_last) {
#pragma unroll
  for (int st = 0; st < 2; ++st) {
    const int uses = n_last >= st ? (n_last - st) / 2 + 1 : 0;
    if (uses % 2 == 1) parity ^= (1u << st) | (1u << (2 + st));
  }
  return parity;
}

// The K and V stages' mbarriers (and, kLastWarpLoads, the warp counts), by thread 0, before a block barrier.
// kAgain (Traits::kFreshBarriers, after a tile whose waits are all done): the barriers are invalidated and set up
// afresh at phase 0; the warp counts carry on (each tile adds whole rounds of kNWarps to them).
template <typename Traits, bool kAgain = false>
__device__ __forceinline__ void init_kv_barriers(unsigned char* smem_raw, int tid) {
  if (tid == 0) {
    const uint32_t bar = smem_u32(smem_raw) + Traits::kOffBar;
    uint32_t* stage_done = reinterpret_cast<uint32_t*>(smem_raw + Traits::kOffCount);
#pragma unroll
    for (int i = 0; i < Traits::kStagesK + Traits::kStagesV; ++i) {
      if constexpr (kAgain) mbar_inval(bar + 8 * i);
      mbar_init(bar + 8 * i, 1);
      if constexpr (Traits::kLastWarpLoads && !kAgain) stage_done[i] = 0;
    }
    fence_mbar_init();
  }
}

}  // namespace sm90

template <typename Traits, typename Element, bool kIsCausal>
using Sm90FwdBlock = fwd_detail::FwdBlock<Element, kIsCausal, Traits::kBlockM, Traits::kBlockN, Traits::kHeadDim>;

// Traits::kPrefetchNext: the block one wave on (linear index + num_sms * kMinBlocks, the grid's order) has its
// Q tile (one line per thread) and its first K and V tiles (thread 0) fetched into L2 while this block runs, so
// that its first copies, which nothing overlaps, hit L2 instead of DRAM.
template <typename Traits, typename Element, bool kIsCausal>
__device__ __forceinline__ void prefetch_next_wave(const FwdParams& params, const sm90::KvTensorMaps& maps, int tid) {
  // (A grid has fewer than 2^31 blocks: the API layer's shapes are int32.)
  const uint32_t linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z) +
                          uint32_t(params.num_sms) * Traits::kMinBlocks;
  if (linear >= gridDim.x * gridDim.y * gridDim.z) return;
  const uint32_t x = linear % gridDim.x;
  const uint32_t yz = linear / gridDim.x;
  const Sm90FwdBlock<Traits, Element, kIsCausal> next(params, kIsCausal ? int(gridDim.x - 1 - x) : int(x),
                                                      int(yz % gridDim.y), int(yz / gridDim.y));
  if (next.n_block_max <= 0) return;
  constexpr int kLinesPerRow = Traits::kHeadDim * 2 / 128;
#pragma unroll
  for (int i = tid; i < Traits::kBlockM * kLinesPerRow; i += Traits::kNThreads) {
    const int row = next.row0 + i / kLinesPerRow;
    if (row < next.len_q) {
      const Element* line = next.q_ptr + int64_t(row) * params.q_stride.row + (i % kLinesPerRow) * 64;
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(line));
    }
  }
  if (tid == 0) {
    const int n_last = next.n_block_max - 1;
    const int h_kv = next.h / params.group;
#pragma unroll
    for (int cb = 0; cb < Traits::kHeadDim / 64; ++cb) {
      sm90::tma_prefetch_l2_4d(&maps.k, cb * 64, n_last * Traits::kBlockN, h_kv, next.b);
      sm90::tma_prefetch_l2_4d(&maps.v, cb * 64, n_last * Traits::kBlockN, h_kv, next.b);
    }
  }
}

// One query tile (blk) of a block. kPersistent: ps carries the block's state from tile to tile; the block's
// next tile (ps.cursor advanced) has its first copies issued once this tile's O is staged.
template <typename Traits, typename Element, bool kIsCausal, bool kHasKpm>
__device__ __forceinline__ void fwd_sm90_tile(const FwdParams& params, const sm90::KvTensorMaps& maps,
                                              const Sm90FwdBlock<Traits, Element, kIsCausal>& blk,
                                              sm90::PersistentState& ps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using ET = ElemTraits<Element>;
  using namespace fwd_detail;
  using namespace sm90;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNWarps * 32;  // the threads that compute (kWarpSpec: after the producer's)
  constexpr int kNFragsS = Traits::kNFragsS;
  constexpr int kNFragsO = Traits::kNFragsO;

  extern __shared__ __align__(1024) unsigned char smem_raw[];

  // kOpaqueTileRegs: tid and sQ are made opaque so that the compiler derives this tile's addresses from them
  // inside the block's loop over tiles instead of keeping them all live across it (255 registers and spills).
  int tid = int(threadIdx.x) - (Traits::kWarpSpec ? 128 : 0);
  if constexpr (Traits::kOpaqueTileRegs) asm volatile("" : "+r"(tid));
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int wg = warp / 4;  // warpgroup: rows [64 wg, 64 wg + 64) of the block
  const int row0 = blk.row0, len_q = blk.len_q, len_k = blk.len_k;
  if (row0 >= len_q) return;
  if (blk.n_block_max <= 0) {
    blk.write_empty_rows(tid, kNThreads);
    return;
  }

  uint32_t sQ = smem_u32(smem_raw);
  if constexpr (Traits::kOpaqueTileRegs) asm volatile("" : "+r"(sQ));
  const uint32_t sK = sQ + Traits::kOffK;
  const uint32_t sV = sQ + Traits::kOffV;
  // This tile's Q (kPrefetchQ: one of two buffers, in turn; the other one receives the next tile's Q).
  const uint32_t sQ_tile = Traits::kPrefetchQ ? sQ + ps.qbuf * Traits::kQBytes : sQ;
  uint32_t* sMaskBits = reinterpret_cast<uint32_t*>(smem_raw + Traits::kOffMask);
  constexpr int kMaskWords = Traits::kMaskWords;
  // Stages of key tile n in the K ring (and its mask words) and the V ring: tiles alternate stages.
  auto stage = [](int n) { return Traits::kStagesK == 1 ? 0 : n % 2; };
  auto v_stage = [](int n) { return Traits::kStagesV == 1 ? 0 : n % 2; };
  auto k_tile = [&](int n) { return sK + stage(n) * Traits::kTileKVBytes; };
  auto v_tile = [&](int n) { return sV + v_stage(n) * Traits::kTileKVBytes; };
  constexpr bool kTma = Traits::kTma;
  // kTma: one mbarrier per K stage, then one per V stage. Tiles run from n_last down and alternate
  // stages, so tile n is use (n_last - n) / stages of its stage's barrier.
  const int n_last = blk.n_block_max - 1;
  const uint32_t bar_k = sQ + Traits::kOffBar;
  const uint32_t bar_v = bar_k + 8 * Traits::kStagesK;
  const int h_kv = blk.h / params.group;
  auto tma_tile = [&](const CUtensorMap* map, uint32_t tile, uint32_t bar, int n, int head_kv, int batch) {
    mbar_arrive_expect_tx(bar, Traits::kTileKVBytes);
#pragma unroll
    for (int cb = 0; cb < kHeadDim / 64; ++cb) {  // one 64-column block of the tile per copy
      tma_load_4d(tile + cb * kBlockN * 128, map, bar, cb * 64, n * kBlockN, head_kv, batch);
    }
  };
  // The bulk copy of tile n into its stage, issued by the calling thread.
  auto copy_k = [&](int n) { tma_tile(&maps.k, k_tile(n), bar_k + 8 * stage(n), n, h_kv, blk.b); };
  auto copy_v = [&](int n) { tma_tile(&maps.v, v_tile(n), bar_v + 8 * v_stage(n), n, h_kv, blk.b); };
  // Called by every thread; with kTma thread 0 issues the copy.
  auto load_k = [&](int n) {
    if constexpr (kTma) {
      if (tid == 0) copy_k(n);
    } else {
      load_tile<kBlockN, kHeadDim, kNThreads>(k_tile(n), blk.k_ptr, params.k_stride.row, n * kBlockN,
                                              len_k - n * kBlockN, tid, params.k);
    }
  };
  auto load_v = [&](int n) {
    if constexpr (kTma) {
      if (tid == 0) copy_v(n);
    } else {
      load_tile<kBlockN, kHeadDim, kNThreads>(v_tile(n), blk.v_ptr, params.v_stride.row, n * kBlockN,
                                              len_k - n * kBlockN, tid, params.v);
    }
  };
  // kPersistent, kWarpSpec: the stages' barriers carry on from the block's earlier tiles (ps.parity), unless
  // kFreshBarriers.
  constexpr bool kCarryParity = (Traits::kPersistent && !Traits::kFreshBarriers) || Traits::kWarpSpec;
  const uint32_t parity0 = kCarryParity ? ps.parity : 0u;
  auto wait_k = [&](int n) {
    mbar_wait(bar_k + 8 * stage(n), (uint32_t((n_last - n) / Traits::kStagesK) ^ (parity0 >> stage(n))) & 1u);
  };
  auto wait_v = [&](int n) {
    mbar_wait(bar_v + 8 * v_stage(n),
              (uint32_t((n_last - n) / Traits::kStagesV) ^ (parity0 >> (2 + v_stage(n)))) & 1u);
  };
  // kLastWarpLoads: warps that are done with each K stage, then each V stage (counted modulo kNWarps).
  uint32_t* stage_done = reinterpret_cast<uint32_t*>(smem_raw + Traits::kOffCount);
  // kWarpSpec: the stages' "empty" barriers (one arrival per warp once it is done with a stage), then Q's.
  const uint32_t bar_k_empty = bar_v + 8 * Traits::kStagesV;
  const uint32_t bar_v_empty = bar_k_empty + 8 * Traits::kStagesK;
  const uint32_t bar_q = bar_v_empty + 8 * Traits::kStagesV, bar_q_empty = bar_q + 8;
  // A persistent or warp-specialized block sets them up once (fwd_sm90_persistent, fwd_sm90_warp_specialized).
  if constexpr (kTma && !Traits::kPersistent && !Traits::kWarpSpec) {
    init_kv_barriers<Traits>(smem_raw, tid);
    __syncthreads();
  }

  // kPersistent: the block's next tile, and whether it has keys to visit (this tile then issues its first copies).
  auto next_tile = [&](bool& has_next) {
    const int num_m = (len_q + kBlockM - 1) / kBlockM;
    sm90::TileCursor nc = ps.cursor;
    nc.advance(params, num_m, (num_m + 1) / 2);
    const Sm90FwdBlock<Traits, Element, kIsCausal> next(params, nc.m_block(num_m), nc.h, nc.b);
    has_next = nc.b < params.batch && next.n_block_max > 0;
    return next;
  };
  // kPersistent: the tile before issued this tile's first copies (Q, K(n_last), and below K(n_last - 1),
  // V(n_last), V(n_last - 1)).
  const bool issue_first = !Traits::kWarpSpec && !(Traits::kPersistent && ps.prefetched);
  if (issue_first) {
    load_tile<kBlockM, kHeadDim, kNThreads>(sQ_tile, blk.q_ptr, params.q_stride.row, row0, len_q - row0, tid,
                                            params.q);
    load_k(n_last);
  }
  cp_async_commit();

  float acc_o[1][kNFragsO][4];
#pragma unroll
  for (int d = 0; d < kNFragsO; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][d][e] = 0.f;
  float row_max[1][2] = {{kNegInf, kNegInf}};
  float row_sum[1][2] = {{0.f, 0.f}};
  float acc_s[1][kNFragsS][4];
  uint32_t p_frag[1][kNFragsS][2];

  // Key padding bits, fetched one tile ahead: publish_kpm(n) stores tile n's bits (one word per 32
  // keys) in its stage before the barrier that precedes their use. With kLastWarpLoads each warpgroup
  // keeps its own copy (kpm_tid, kpm_warp: the thread and warp within the warpgroup).
  constexpr bool kMaskPerWg = Traits::kLastWarpLoads;
  const int kpm_tid = kMaskPerWg ? tid % 128 : tid;
  const int kpm_warp = kMaskPerWg ? warp % 4 : warp;
  uint32_t* sMaskWg = sMaskBits + (kMaskPerWg ? wg * Traits::kStagesK * kMaskWords : 0);
  const unsigned char* kpm_row = nullptr;
  unsigned char kpm_next = 0;
  auto fetch_kpm = [&](int n) -> unsigned char {
    const int col = n * kBlockN + kpm_tid;
    return (kpm_tid < kBlockN && col < len_k) ? __ldg(kpm_row + col) : static_cast<unsigned char>(0);
  };
  auto publish_kpm = [&](int n) {
    const uint32_t bits = __ballot_sync(0xffffffffu, kpm_next != 0);
    if (lane == 0 && kpm_warp < kMaskWords) sMaskWg[stage(n) * kMaskWords + kpm_warp] = bits;
  };
  if (kHasKpm) {
    kpm_row = reinterpret_cast<const unsigned char*>(params.key_padding_mask) +
              blk.b * params.key_padding_mask_batch_stride;
    kpm_next = fetch_kpm(n_last);
  }

  // Descriptors: this warpgroup's 64 rows of Q; K / V tiles from k_tile / v_tile. Each k-step's descriptor is
  // the tile's plus its byte offset (desc_add).
  constexpr uint32_t kSbo = 8 * 128;            // 8 rows of 128 bytes
  constexpr uint32_t kQBlock = kBlockM * 128;   // next 64 columns of Q
  constexpr uint32_t kKVBlock = kBlockN * 128;  // next 64 columns of K / V
  const uint64_t q_desc = make_desc(sQ_tile + wg * 64 * 128, 16, kSbo);

  // S = Q K(n)^T, issued (not waited for).
  auto issue_qk = [&](int n) {
    const uint64_t k_desc = make_desc(k_tile(n), 16, kSbo);
    // kPersistent, kWarpSpec: the first k-step overwrites S (scale_d = 0); inside a block's loop over tiles ptxas
    // no longer folds zeroed accumulators into that step, as it does for the other kernels.
    constexpr bool kOverwrite = Traits::kPersistent || Traits::kWarpSpec;
    if constexpr (!kOverwrite) {
#pragma unroll
      for (int j = 0; j < kNFragsS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[0][j][e] = 0.f;
    }
    fence_accumulator(acc_s[0]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Traits::kKStepsQK; ++kk) {
      const uint32_t k_off = (kk % 4) * 32;  // k16 steps inside a 128-byte row
      wgmma_ss<Element, kBlockN>(acc_s[0], desc_add(q_desc, (kk / 4) * kQBlock + k_off),
                                 desc_add(k_desc, (kk / 4) * kKVBlock + k_off),
                                 kOverwrite ? int(kk > 0) : 1);
    }
    wgmma_commit();
  };
  // O += P V(n), issued: P of n8 fragments 2 kk and 2 kk + 1 is the A fragment of k-step kk (16 keys).
  auto issue_pv = [&](int n) {
    const uint64_t v_desc = make_desc(v_tile(n), kKVBlock, kSbo);
    fence_accumulator(acc_o[0]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Traits::kKStepsPV; ++kk) {
      const uint32_t pa[4] = {p_frag[0][2 * kk][0], p_frag[0][2 * kk][1], p_frag[0][2 * kk + 1][0],
                              p_frag[0][2 * kk + 1][1]};
      wgmma_rs<Element, kHeadDim>(acc_o[0], pa, desc_add(v_desc, kk * 16 * 128), 1);
    }
    wgmma_commit();
  };
  // Scale S of tile n to log2 units and mask it (key padding bits of its stage, published before).
  auto mask_tile = [&](int n) {
    const int col0 = n * kBlockN;
    uint32_t kpm_words[kHasKpm ? kMaskWords : 1];
    if (kHasKpm) {
#pragma unroll
      for (int w = 0; w < kMaskWords; ++w) kpm_words[w] = sMaskWg[stage(n) * kMaskWords + w] >> (2 * t);
    }
    const bool need_limit_mask =
        (col0 + kBlockN > blk.seqlen_k) || (kIsCausal && col0 + kBlockN - 1 > row0 + blk.diag);
    scale_and_mask<kIsCausal, kHasKpm, 1, kNFragsS, !Traits::kFoldScale>(acc_s, params.scale_log2, col0,
                                                                        row0 + warp * 16 + g, blk.seqlen_k,
                                                                        blk.diag, t, kpm_words, need_limit_mask);
  };

  if constexpr (!Traits::kOverlap) {
    // Two barriers per tile: the copy of V(n) overlaps S = Q K(n)^T, the copy of K(n - 1) overlaps the
    // softmax and O += P V(n).
    for (int n = n_last; n >= 0; --n) {
      if (kHasKpm) publish_kpm(n);
      // K(n) (and Q) landed; every warpgroup is done with V(n + 1): start copying V(n).
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
      load_v(n);
      cp_async_commit();

      issue_qk(n);
      wgmma_wait<0>();
      fence_accumulator(acc_s[0]);
      mask_tile(n);

      // V(n) landed; every warpgroup is done with K(n): start copying K(n - 1).
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
      if (n > 0) {
        load_k(n - 1);
        cp_async_commit();
        if (kHasKpm) kpm_next = fetch_kpm(n - 1);
      }

      online_softmax<ET>(acc_s, acc_o, row_max, row_sum, p_frag);
      issue_pv(n);
      wgmma_wait<0>();
      fence_accumulator(acc_o[0]);
    }
  } else if constexpr (Traits::kLastWarpLoads) {
    // The overlapped schedule below (two V stages, TMA) for two warpgroups that share the K and V rings but
    // never wait for each other: a stage is free once all kNWarps warps have counted themselves off it
    // (K(n)'s once S(n) has landed, V(n)'s once P V(n) has), and the warp whose count completes the round
    // issues the copy of the tile two steps on into it: K(n - 2), V(n - 2). A warpgroup waits only for the
    // copies (mbarriers), so one may run up to a tile ahead of the other.
    constexpr int kNWarps = Traits::kNWarps;
    // kWarpSpec: each warp arrives on the stage's empty barrier instead (and, done with S(0), on Q's); the
    // producer issues the copies.
    auto done_with_k = [&](int n) {
      if constexpr (Traits::kWarpSpec) {
        if (lane == 0) {
          mbar_arrive(bar_k_empty + 8 * stage(n));
          if (n == 0) mbar_arrive(bar_q_empty);
        }
      } else if (lane == 0 && atomicAdd(stage_done + stage(n), 1u) % kNWarps == kNWarps - 1 && n >= 2) {
        copy_k(n - 2);
      }
    };
    auto done_with_v = [&](int n) {
      if constexpr (Traits::kWarpSpec) {
        if (lane == 0) mbar_arrive(bar_v_empty + 8 * v_stage(n));
      } else if (lane == 0 && atomicAdd(stage_done + Traits::kStagesK + v_stage(n), 1u) % kNWarps == kNWarps - 1 &&
                 n >= 2) {
        copy_v(n - 2);
      }
    };
    // Both stages of each ring are free: K(n_last) is on its way, K(n_last - 1), V(n_last), V(n_last - 1)
    // (kLateFirstCopies: below, once K(n_last) has landed).
    constexpr int kNWg = Traits::kBlockM / 64;
    auto copy_first_tiles = [&]() {
      if (n_last > 0) copy_k(n_last - 1);
      copy_v(n_last);
      if (n_last > 0) copy_v(n_last - 1);
    };
    if (!Traits::kLateFirstCopies && tid == 0 && issue_first) copy_first_tiles();
    if constexpr (Traits::kPrefetchNext) prefetch_next_wave<Traits, Element, kIsCausal>(params, maps, tid);
    if (kHasKpm) {
      publish_kpm(n_last);
      if (n_last > 0) kpm_next = fetch_kpm(n_last - 1);
    }
    if constexpr (Traits::kWarpSpec) {
      if (kHasKpm) warpgroup_barrier(wg);  // the key padding bits of n_last
      mbar_wait(bar_q, (ps.parity >> 4) & 1u);
    } else {
      cp_async_wait<0>();  // Q
      fence_proxy_async();
      __syncthreads();  // Q and the key padding bits of n_last
    }
    wait_k(n_last);
    issue_qk(n_last);
    // kPingPong: the MMAs of each iteration are issued in turns, warpgroup 0 first; the last warpgroup does
    // not pass the turn after its last iteration, so every arrive meets a wait. It passes the first turn once
    // its softmax of S(n_last) is done, or (kEarlyTurn) once that S is issued, so that warpgroup 0's first
    // products run under that softmax.
    if constexpr (Traits::kPingPong && Traits::kEarlyTurn) {
      if (wg == kNWg - 1 && n_last > 0) pass_turn<kNWg>(wg);
    }
    if constexpr (Traits::kLateFirstCopies) {
      if (tid == (kNWg - 1) * 128) copy_first_tiles();
    }
    if constexpr (Traits::kPrefetchQ) {  // the next tile's Q into the other buffer, under this S
      bool has_next;
      const auto next = next_tile(has_next);
      if (has_next) {
        load_tile<kBlockM, kHeadDim, kNThreads>(sQ + (ps.qbuf ^ 1u) * Traits::kQBytes, next.q_ptr, params.q_stride.row,
                                                next.row0, len_q - next.row0, tid, params.q);
        cp_async_commit();
      }
    }
    wgmma_wait<0>();
    fence_accumulator(acc_s[0]);
    done_with_k(n_last);
    mask_tile(n_last);
    float alpha[1][2];
    // O is still 0: nothing to rescale.
    softmax_in_place<Traits::kFoldScale, Traits::kEmulateExpEvery>(acc_s, row_max, row_sum, alpha, params.scale_log2);
    pack_p<ET>(acc_s, p_frag);

    if constexpr (Traits::kPingPong && !Traits::kEarlyTurn) {
      if (wg == kNWg - 1 && n_last > 0) pass_turn<kNWg>(wg);
    }
    for (int n_iter = n_last - 1; n_iter >= 0; --n_iter) {
      const int n = Traits::kUniformKeyIndex ? uniform(n_iter) : n_iter;
      if (kHasKpm) {
        publish_kpm(n);
        warpgroup_barrier(wg);  // this warpgroup's bits of tile n are stored, and those of n + 2 read
        if (n > 0) kpm_next = fetch_kpm(n - 1);
      }
      wait_k(n);
      if constexpr (Traits::kPingPong) {
        wait_v(n + 1);  // the tiles first: a turn is not held while a copy lands
        wait_turn<kNWg>(wg);
      }
      issue_qk(n);
      if constexpr (!Traits::kPingPong) wait_v(n + 1);
      issue_pv(n + 1);
      if constexpr (Traits::kPingPong) {
        const bool last_wg = kNWg == 2 ? wg != 0 : wg == kNWg - 1;  // two: as the measured kernel has it
        if (!last_wg || n > 0) pass_turn<kNWg>(wg);
      }
      wgmma_wait<1>();  // S(n)
      fence_accumulator(acc_s[0]);
      done_with_k(n);
      mask_tile(n);
      softmax_in_place<Traits::kFoldScale, Traits::kEmulateExpEvery>(acc_s, row_max, row_sum, alpha,
                                                                    params.scale_log2);
      if constexpr (Traits::kPinSoftmax) keep_above_wait(acc_s[0], row_sum, alpha);
      wgmma_wait<0>();  // O += P(n + 1) V(n + 1)
      fence_accumulator(acc_o[0]);
      fence_operand(p_frag[0]);
      done_with_v(n + 1);
      rescale_o(acc_o, alpha);
      pack_p<ET>(acc_s, p_frag);
    }
    wait_v(0);
    issue_pv(0);
    wgmma_wait<0>();
    fence_accumulator(acc_o[0]);
    if constexpr (Traits::kWarpSpec) {
      done_with_v(0);
      ps.parity = next_parity(ps.parity, n_last) ^ (1u << 4);  // and one use of Q's barrier
    }
  } else {
    // One barrier per tile with two V stages. Iteration n issues S = Q K(n)^T and O += P(n + 1) V(n + 1)
    // together, then runs the softmax of S(n) while the second product is in flight; O is rescaled once
    // it has landed. The copies of K(n - 1) and V(n) (into the stages of K(n + 1) and V(n + 2), both done
    // with) overlap the whole iteration.
    // With one V buffer (kOneV): wait for K(n), start the copy of K(n - 1), issue S(n); wait for V(n + 1)
    // (its copy ran under the previous softmax and this S), issue P V; once every warp is done with it
    // (a barrier) start the copy of V(n). Copy groups then stay in the order K(n), V(n + 1) at the top of
    // iteration n (empty groups where a tile does not exist).
    // With kTma the cp.async groups hold Q only; the barriers say when K and V tiles have landed.
    constexpr bool kOneV = Traits::kStagesV == 1;
    if constexpr (kOneV) {
      if (n_last > 0) load_k(n_last - 1);
      cp_async_commit();
      load_v(n_last);
    } else {
      load_v(n_last);
      if (n_last > 0) load_k(n_last - 1);
    }
    cp_async_commit();
    if (kHasKpm) {
      publish_kpm(n_last);
      if (n_last > 0) kpm_next = fetch_kpm(n_last - 1);
    }
    cp_async_wait<kTma ? 0 : (kOneV ? 2 : 1)>();  // Q, K(n_last)
    if constexpr (kTma) wait_k(n_last);
    fence_proxy_async();
    __syncthreads();
    issue_qk(n_last);
    wgmma_wait<0>();
    fence_accumulator(acc_s[0]);
    mask_tile(n_last);
    float alpha[1][2];
    // O is still 0: nothing to rescale.
    softmax_in_place<Traits::kFoldScale, Traits::kEmulateExpEvery>(acc_s, row_max, row_sum, alpha, params.scale_log2);
    pack_p<ET>(acc_s, p_frag);

    for (int n = n_last - 1; n >= 0; --n) {
      if (kHasKpm) publish_kpm(n);
      if constexpr (!kTma) {
        cp_async_wait<kOneV ? 1 : 0>();  // K(n), and V(n + 1) with two V stages
        fence_proxy_async();
      }
      __syncthreads();  // every warp is done with the stages of K(n + 1) and (two V stages) V(n + 2)
      if (n > 0) load_k(n - 1);
      if constexpr (!kOneV) load_v(n);
      if constexpr (!kTma) cp_async_commit();
      if (kHasKpm && n > 0) kpm_next = fetch_kpm(n - 1);

      if constexpr (kTma) wait_k(n);
      issue_qk(n);
      if constexpr (kTma) {
        wait_v(n + 1);
      } else if constexpr (kOneV) {
        cp_async_wait<1>();  // V(n + 1); K(n - 1) may still be in flight
        fence_proxy_async();
        __syncthreads();
      }
      // kLateRescale: O *= alpha(n + 1) here, under S(n), not after P V(n + 2) at the end of the last
      // iteration, where the tensor cores of this block wait for it.
      if constexpr (Traits::kLateRescale) rescale_o(acc_o, alpha);
      issue_pv(n + 1);
      wgmma_wait<1>();  // S(n)
      fence_accumulator(acc_s[0]);
      mask_tile(n);
      softmax_in_place<Traits::kFoldScale, Traits::kEmulateExpEvery>(acc_s, row_max, row_sum, alpha, params.scale_log2);
      if constexpr (Traits::kPinSoftmax) keep_above_wait(acc_s[0], row_sum, alpha);
      wgmma_wait<0>();  // O += P(n + 1) V(n + 1)
      fence_accumulator(acc_o[0]);
      fence_operand(p_frag[0]);
      if constexpr (kOneV) {
        __syncthreads();  // no warp reads V(n + 1) any more
        load_v(n);
        if constexpr (!kTma) cp_async_commit();
      }
      if constexpr (!Traits::kLateRescale) rescale_o(acc_o, alpha);
      pack_p<ET>(acc_s, p_frag);
    }
    if constexpr (kTma) {
      wait_v(0);
    } else {
      cp_async_wait<0>();  // V(0)
      fence_proxy_async();
      __syncthreads();
    }
    if constexpr (Traits::kLateRescale) rescale_o(acc_o, alpha);
    issue_pv(0);
    wgmma_wait<0>();
    fence_accumulator(acc_o[0]);
  }

  // Epilogue: normalise, write lse, stage O in this warp's rows of sQ (same swizzle; n8 fragment d is
  // chunk d of the row; kPersistent, kWarpSpec: of sO, since the next tile's Q goes into sQ), then 16-byte row
  // stores. kWarpSpec: once the warpgroup's bulk copies of the tile before have read its rows of sO.
  constexpr bool kOwnO = Traits::kPersistent || Traits::kWarpSpec;
  unsigned char* const sO = smem_raw + (kOwnO ? Traits::kOffOAligned : 0);
  if constexpr (Traits::kWarpSpec) {
    if (tid % 128 == 0) bulk_wait_read<0>();
    warpgroup_barrier(wg);
  }
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    float lse;
    const float inv = finish_row(row_sum[0][hi], row_max[0][hi], &lse);
    const int row_local = warp * 16 + g + hi * 8;
    if (t == 0 && row0 + row_local < len_q) blk.lse_ptr[row0 + row_local] = lse;
#pragma unroll
    for (int d = 0; d < kNFragsO; ++d) {
      *reinterpret_cast<uint32_t*>(sO + swizzled_offset(row_local, d, kBlockM) + 4 * t) =
          ET::pack(acc_o[0][d][hi * 2] * inv, acc_o[0][d][hi * 2 + 1] * inv);
    }
  }
  // kWgEpilogue: each warpgroup stages and stores its own 64 rows (in its own rows of sQ, which only its S
  // products read), so that the first to finish does not wait for the other's last products.
  if constexpr (Traits::kTmaStoreO) {
    // One thread per warpgroup stores its 64 rows, one box per 64 columns, and waits until they are read
    // (the block's shared memory must outlive the copies).
    fence_proxy_async();
    warpgroup_barrier(wg);
    if (tid % 128 == 0) {
      const uint32_t o_base = smem_u32(sO);
#pragma unroll
      for (int cb = 0; cb < kHeadDim / 64; ++cb) {
        tma_store_4d(&maps.o, o_base + cb * kBlockM * 128 + wg * 64 * 128, cb * 64, row0 + wg * 64, blk.h, blk.b);
      }
      bulk_commit();
      if constexpr (!Traits::kWarpSpec) bulk_wait_read<0>();  // kWarpSpec: before the next tile's staging
    }
    return;
  } else if constexpr (Traits::kWgEpilogue) {
    warpgroup_barrier(wg);  // this warpgroup's rows of O staged
  } else {
    __syncthreads();  // O staged; every warp is past its last MMA (sQ, sK and sV free)
  }
  if constexpr (Traits::kPersistent) {
    // The next tile's first copies, under this tile's stores (none for a tile without visible keys; kPrefetchQ:
    // its Q is on its way already, into the other buffer). kFreshBarriers: every wait on the stages' barriers is
    // done (the block barrier above), so thread 0 sets them up afresh first.
    if constexpr (Traits::kFreshBarriers) init_kv_barriers<Traits, true>(smem_raw, tid);
    bool has_next;
    const auto next = next_tile(has_next);
    if (has_next) {
      const int nl = next.n_block_max - 1;
      if constexpr (!Traits::kPrefetchQ) {
        load_tile<kBlockM, kHeadDim, kNThreads>(sQ, next.q_ptr, params.q_stride.row, next.row0, len_q - next.row0,
                                                tid, params.q);
        cp_async_commit();
      }
      if (tid == 0) {
        const int head_kv = next.h / params.group;
        tma_tile(&maps.k, k_tile(nl), bar_k + 8 * stage(nl), nl, head_kv, next.b);
        if (nl > 0) tma_tile(&maps.k, k_tile(nl - 1), bar_k + 8 * stage(nl - 1), nl - 1, head_kv, next.b);
        tma_tile(&maps.v, v_tile(nl), bar_v + 8 * v_stage(nl), nl, head_kv, next.b);
        if (nl > 0) tma_tile(&maps.v, v_tile(nl - 1), bar_v + 8 * v_stage(nl - 1), nl - 1, head_kv, next.b);
      }
    }
    ps.parity = next_parity(ps.parity, n_last);
    ps.prefetched = has_next;
    if (Traits::kPrefetchQ && has_next) ps.qbuf ^= 1u;
  }
  constexpr int kOutThreads = Traits::kWgEpilogue ? 128 : kNThreads;
  constexpr int kOutChunks = (Traits::kWgEpilogue ? 64 : kBlockM) * Traits::kChunksPerRow;
  static_assert(kOutChunks % kOutThreads == 0, "output copy splits evenly");
  const int out_tid = Traits::kWgEpilogue ? tid % 128 : tid;
  const int out_row0 = Traits::kWgEpilogue ? wg * 64 : 0;
#pragma unroll
  for (int i = 0; i < kOutChunks / kOutThreads; ++i) {
    const int idx = i * kOutThreads + out_tid;
    const int r = out_row0 + idx / Traits::kChunksPerRow;
    const int c = idx % Traits::kChunksPerRow;
    if (row0 + r < len_q) {
      *reinterpret_cast<uint4*>(blk.o_ptr + static_cast<int64_t>(row0 + r) * kHeadDim + c * 8) =
          *reinterpret_cast<const uint4*>(sO + swizzled_offset(r, c, kBlockM));
    }
  }
#endif
}

// kPersistent: the block's tiles in TileCursor's order.
template <typename Traits, typename Element, bool kIsCausal, bool kHasKpm>
__device__ __forceinline__ void fwd_sm90_persistent(const FwdParams& params, const sm90::KvTensorMaps& maps) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  sm90::init_kv_barriers<Traits>(smem_raw, threadIdx.x);
  __syncthreads();
  const int num_m = (params.len_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int units_per_head = (num_m + 1) / 2;
  sm90::PersistentState ps;
  ps.cursor.first(params, units_per_head);
  while (ps.cursor.b < params.batch) {
    const Sm90FwdBlock<Traits, Element, kIsCausal> blk(params, ps.cursor.m_block(num_m), ps.cursor.h, ps.cursor.b);
    fwd_sm90_tile<Traits, Element, kIsCausal, kHasKpm>(params, maps, blk, ps);
    ps.cursor.advance(params, num_m, units_per_head);
  }
}

// kWarpSpec: the producer, one thread. For each of the block's query tiles with keys to visit (TileCursor's
// order, as the computing warpgroups walk them), in the order the key loop reads them: Q, K(n_last), then K(n),
// V(n + 1) for n = n_last - 1 .. 0, then V(0), each once its buffer is released (its empty barrier; the first use
// of a buffer waits for parity 1, which a fresh barrier has passed).
template <typename Traits, typename Element, bool kIsCausal>
__device__ __forceinline__ void fwd_sm90_produce(const FwdParams& params, const sm90::KvTensorMaps& maps,
                                                 uint32_t sQ, sm90::TileCursor cursor) {
  using namespace sm90;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStagesK = Traits::kStagesK;
  const uint32_t sK = sQ + Traits::kOffK, sV = sQ + Traits::kOffV;
  const uint32_t bar_k = sQ + Traits::kOffBar, bar_v = bar_k + 8 * kStagesK;
  const uint32_t bar_k_empty = bar_v + 8 * Traits::kStagesV, bar_v_empty = bar_k_empty + 8 * kStagesK;
  const uint32_t bar_q = bar_v_empty + 8 * Traits::kStagesV, bar_q_empty = bar_q + 8;
  uint32_t phase = 0;  // bit s: uses of K stage s so far, mod 2; bit 2 + s: V stage s's; bit 4: Q's
  auto acquire = [&](uint32_t empty, int bit) {
    mbar_wait(empty, ((phase >> bit) & 1u) ^ 1u);
    phase ^= 1u << bit;
  };
  // Box rows row0 .. row0 + rows of (h, b) into dst, 64 columns per copy, counted on bar.
  auto copy = [&](const CUtensorMap* map, uint32_t dst, uint32_t bar, int rows, int row0, int h, int b) {
    mbar_arrive_expect_tx(bar, rows * Traits::kHeadDim * 2);
#pragma unroll
    for (int cb = 0; cb < Traits::kHeadDim / 64; ++cb) tma_load_4d(dst + cb * rows * 128, map, bar, cb * 64, row0, h, b);
  };
  const int num_m = (params.len_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int units_per_head = (num_m + 1) / 2;
  for (; cursor.b < params.batch; cursor.advance(params, num_m, units_per_head)) {
    const Sm90FwdBlock<Traits, Element, kIsCausal> blk(params, cursor.m_block(num_m), cursor.h, cursor.b);
    if (blk.n_block_max <= 0) continue;
    const int h_kv = blk.h / params.group;
    auto copy_k = [&](int n) {
      const int st = n % 2;
      acquire(bar_k_empty + 8 * st, st);
      copy(&maps.k, sK + st * Traits::kTileKVBytes, bar_k + 8 * st, kBlockN, n * kBlockN, h_kv, blk.b);
    };
    auto copy_v = [&](int n) {
      const int st = n % 2;
      acquire(bar_v_empty + 8 * st, 2 + st);
      copy(&maps.v, sV + st * Traits::kTileKVBytes, bar_v + 8 * st, kBlockN, n * kBlockN, h_kv, blk.b);
    };
    acquire(bar_q_empty, 4);
    copy(&maps.q, sQ, bar_q, Traits::kBlockM, blk.row0, blk.h, blk.b);
    const int n_last = blk.n_block_max - 1;
    copy_k(n_last);
    for (int n = n_last - 1; n >= 0; --n) {
      copy_k(n);
      copy_v(n + 1);
    }
    copy_v(0);
  }
}

// kWarpSpec: warpgroup 0 produces (fwd_sm90_produce, 24 registers), warpgroups 1 and 2 compute the block's tiles
// (fwd_sm90_tile, 240 registers); one block per SM.
template <typename Traits, typename Element, bool kIsCausal, bool kHasKpm>
__device__ __forceinline__ void fwd_sm90_warp_specialized(const FwdParams& params, const sm90::KvTensorMaps& maps) {
  using namespace sm90;
  static_assert(Traits::kStagesK == 2 && Traits::kStagesV == 2, "two K and two V stages");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t sQ = smem_u32(smem_raw);
  if (threadIdx.x == 0) {
    // Full barriers: the producer's arrival with the bytes; empty ones: one arrival per computing warp.
    constexpr int kFull = Traits::kStagesK + Traits::kStagesV;
#pragma unroll
    for (int i = 0; i < Traits::kNumBars; ++i) {
      const bool empty = (i >= kFull && i < 2 * kFull) || i == Traits::kNumBars - 1;
      mbar_init(sQ + Traits::kOffBar + 8 * i, empty ? Traits::kNWarps : 1);
    }
    fence_mbar_init();
  }
  __syncthreads();
  const int num_m = (params.len_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int units_per_head = (num_m + 1) / 2;
  PersistentState ps;
  ps.cursor.first(params, units_per_head);
  if (threadIdx.x < 128) {
    setmaxnreg_dec<24>();
    if (threadIdx.x == 0) fwd_sm90_produce<Traits, Element, kIsCausal>(params, maps, sQ, ps.cursor);
    return;
  }
  setmaxnreg_inc<240>();
  for (; ps.cursor.b < params.batch; ps.cursor.advance(params, num_m, units_per_head)) {
    const Sm90FwdBlock<Traits, Element, kIsCausal> blk(params, ps.cursor.m_block(num_m), ps.cursor.h, ps.cursor.b);
    fwd_sm90_tile<Traits, Element, kIsCausal, kHasKpm>(params, maps, blk, ps);
  }
  if (threadIdx.x % 128 == 0) bulk_wait<0>();  // the last tile's output stores
}

template <typename Traits, typename Element, bool kIsCausal, bool kHasKpm>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks)
    flash_fwd_sm90_kernel(const FwdParams params, const __grid_constant__ sm90::KvTensorMaps maps) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (Traits::kWarpSpec) {
    fwd_sm90_warp_specialized<Traits, Element, kIsCausal, kHasKpm>(params, maps);
  } else if constexpr (Traits::kPersistent) {
    fwd_sm90_persistent<Traits, Element, kIsCausal, kHasKpm>(params, maps);
  } else {
    sm90::PersistentState unused;
    const Sm90FwdBlock<Traits, Element, kIsCausal> blk(params);
    fwd_sm90_tile<Traits, Element, kIsCausal, kHasKpm>(params, maps, blk, unused);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_90a only; never launched on other devices (see run_fwd_sm90)
#endif
}

template <typename Traits, typename Element>
void launch_fwd_sm90(const FwdParams& params, cudaStream_t stream, const sm90::KvTensorMaps& maps) {
  const auto kernel_of = [](auto causal, auto kpm) {
    return &flash_fwd_sm90_kernel<Traits, Element, decltype(causal)::value, decltype(kpm)::value>;
  };
  if constexpr (Traits::kPersistent || Traits::kWarpSpec) {  // one block per SM, at most one per unit (TileCursor)
    const int64_t num_m = (params.len_q + Traits::kBlockM - 1) / Traits::kBlockM;
    const int64_t units = (num_m + 1) / 2 * params.heads_q * params.batch;
    launch_one_pass_fwd_on<Traits>(dim3(unsigned(std::min<int64_t>(units, std::max(params.num_sms, 1)))), params,
                                   stream, kernel_of, maps);
  } else {
    launch_one_pass_fwd<Traits>(params, stream, kernel_of, maps);
  }
}

// The output's strides: (B, Hq, Nq, D), contiguous.
inline Strides4 out_strides(const FwdParams& params, int head_dim) {
  const int64_t head = int64_t(params.len_q) * head_dim;
  return Strides4{params.heads_q * head, head, head_dim};
}

// Launcher: grid (query tiles, Hq, B); the requirements of run_fwd, plus an sm_90 device. Tiles with
// kTma fall back to cp.async copies when a tensor map of K or V cannot be made (e.g. a stride the copy
// engine cannot address); tiles with kFoldScale hand a scale that is not positive to the mma.sync kernel.
template <typename Traits, typename Element, int HeadDim>
void run_fwd_sm90_tiles(const FwdParams& params, cudaStream_t stream) {
  if constexpr (Traits::kFoldScale) {
    if (!(params.scale_log2 > 0.f)) {
      run_fwd<Element, HeadDim>(params, stream);
      return;
    }
  }
  sm90::KvTensorMaps maps{};
  if constexpr (Traits::kTma) {
    constexpr bool kBf16 = std::is_same_v<Element, __nv_bfloat16>;
    const bool mapped =
        make_tensor_map_4d(&maps.k, params.k, kBf16, params.batch, params.heads_kv, params.len_k, HeadDim,
                           params.k_stride, Traits::kBlockN) &&
        make_tensor_map_4d(&maps.v, params.v, kBf16, params.batch, params.heads_kv, params.len_k, HeadDim,
                           params.v_stride, Traits::kBlockN) &&
        (!Traits::kTmaStoreO ||
         make_tensor_map_4d(&maps.o, params.out, kBf16, params.batch, params.heads_q, params.len_q, HeadDim,
                            out_strides(params, HeadDim), 64)) &&
        (!Traits::kWarpSpec || make_tensor_map_4d(&maps.q, params.q, kBf16, params.batch, params.heads_q,
                                                  params.len_q, HeadDim, params.q_stride, Traits::kBlockM));
    if (mapped) {
      launch_fwd_sm90<Traits, Element>(params, stream, maps);
      return;
    }
  }
  launch_fwd_sm90<typename Traits::WithoutTma, Element>(params, stream, maps);
}

// The head dim's default tiles, or its small-grid or long-key tiles where the API layer chose them.
template <typename Element, int HeadDim>
void run_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  using Config = FwdSm90Config<HeadDim>;
  if constexpr (!std::is_same_v<typename Config::SmallGridTraits, typename Config::Traits>) {
    if (params.sm90_tiles == Sm90Tiles::kSmallGrid) {
      run_fwd_sm90_tiles<typename Config::SmallGridTraits, Element, HeadDim>(params, stream);
      return;
    }
  }
  if constexpr (!std::is_same_v<typename Config::LongKeysTraits, typename Config::Traits>) {
    if (params.sm90_tiles == Sm90Tiles::kLongKeys) {
      run_fwd_sm90_tiles<typename Config::LongKeysTraits, Element, HeadDim>(params, stream);
      return;
    }
  }
  run_fwd_sm90_tiles<typename Config::Traits, Element, HeadDim>(params, stream);
}

}  // namespace flash
