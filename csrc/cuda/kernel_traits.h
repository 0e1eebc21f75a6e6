// Tile configuration of the forward kernel per head dim (sm_80 / sm_90 with mma.sync).
//
// A block computes kBlockM query rows of one (batch, query head) against all visible keys, in
// tiles of kBlockN keys. Warp w owns the query rows [w * kRowsPerWarp, (w + 1) * kRowsPerWarp),
// kMFrags slabs of 16 rows (one m16 MMA fragment each), and keeps S (its rows x kBlockN) and the
// output accumulator O (its rows x kHeadDim) in fp32 registers.
//
// Shared memory (dynamic), row-major tiles of 16-bit elements with rows padded by 8 elements
// (16 bytes): the row pitch is 16 * odd bytes, so 8 consecutive rows at the same 16-byte column
// fall into 8 distinct bank groups and every ldmatrix phase is conflict-free.
//   sQ [kBlockM][kSmemPitch]   (reused to stage O for coalesced 16-byte stores)
//   sK [kBlockN][kSmemPitch]
//   sV [kBlockN][kSmemPitch]
//   key padding bits of the current K tile, kBlockN / 32 words
// K and V have one buffer each; the copy of V(n) overlaps S = Q K(n)^T and the copy of K(n-1)
// overlaps the softmax and O += P V(n).
#pragma once

#include <type_traits>

namespace flash {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kMinBlocks_ = 1>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocks = kMinBlocks_;  // blocks per SM asked of the register allocator

  static constexpr int kRowsPerWarp = kBlockM / kNWarps;
  static constexpr int kMFrags = kRowsPerWarp / 16;  // m16 fragments per warp
  static constexpr int kNFragsS = kBlockN / 8;       // n8 fragments of S per warp row slab
  static constexpr int kNFragsO = kHeadDim / 8;      // n8 fragments of O
  static constexpr int kKStepsQK = kHeadDim / 16;    // k16 steps of Q K^T
  static constexpr int kKStepsPV = kBlockN / 16;     // k16 steps of P V

  // 16-byte chunks (8 elements) per row and the padded row pitch in elements.
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kSmemPitch = kHeadDim + 8;
  static constexpr int kElemBytes = 2;

  static constexpr int kSmemQElems = kBlockM * kSmemPitch;
  static constexpr int kSmemKVElems = kBlockN * kSmemPitch;
  // Key padding bits of the current K tile (one 32-bit word per 32 keys), after V.
  static constexpr int kSmemMaskOffset = (kSmemQElems + 2 * kSmemKVElems) * kElemBytes;
  static constexpr int kSmemBytes = kSmemMaskOffset + 16 * ((kBlockN / 32 * 4 + 15) / 16);

  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kBlockN % 16 == 0, "block N must be a multiple of 16");
  static_assert(kRowsPerWarp % 16 == 0 && kMFrags >= 1, "each warp owns whole 16-row slabs");
  static_assert(kBlockN % 32 == 0 && kBlockN <= kNThreads, "one thread per key fetches the key padding byte");
  static_assert(kNFragsO % 2 == 0 && kNFragsS % 2 == 0, "ldmatrix.x4 loads two n8 fragments");
  static_assert((kBlockM * kChunksPerRow) % kNThreads == 0, "Q tile copy splits evenly");
  static_assert((kBlockN * kChunksPerRow) % kNThreads == 0, "K/V tile copy splits evenly");
};

// Per head dim choice (the FlashAttention-2 sm80 shapes):
//   D = 32:  128 x 128, 4 warps (32 rows each)
//   D = 64:  128 x 64,  4 warps (as fast as 128 x 128 on H100, fewer registers)
//   D = 96:  128 x 64,  4 warps
//   D = 128: 128 x 64,  4 warps
//   D = 256: 128 x 64,  8 warps (16 rows each)
// D = 64 candidates, picked at compile time with -DFLASH_FWD_VARIANT_HDIM64=<v> (timed against SDPA
// flash by `bash scripts/gpu_check.sh fwdtiles`; H200, 2026-11-29, docs/perf.md v4):
//   0: 128 x 64, 4 warps of 32 rows (222 registers, 2 blocks per SM): 0.98-1.08x (default);
//   1: 128 x 64, 8 warps of 16 rows, 2 blocks per SM (<= 128 registers, 16 warps per SM): 0.89-1.01x;
//   2: 128 x 128, 8 warps of 16 rows (~200 registers, 1 block per SM): 0.81-0.87x.
template <int kHeadDim, int kVariant>
struct FwdVariant {
  static_assert(kVariant < 0, "no forward tile variant with this number for this head dim");
};
template <>
struct FwdVariant<64, 0> {
  using Traits = FwdTraits<64, 128, 64, 4>;
};
template <>
struct FwdVariant<64, 1> {
  using Traits = FwdTraits<64, 128, 64, 8, 2>;
};
template <>
struct FwdVariant<64, 2> {
  using Traits = FwdTraits<64, 128, 128, 8>;
};
#ifndef FLASH_FWD_VARIANT_HDIM64
#define FLASH_FWD_VARIANT_HDIM64 0
#endif

template <int kHeadDim>
struct FwdConfig;
template <>
struct FwdConfig<32> {
  using Traits = FwdTraits<32, 128, 128, 4>;
};
template <>
struct FwdConfig<64> {
  using Traits = FwdVariant<64, FLASH_FWD_VARIANT_HDIM64>::Traits;
};
template <>
struct FwdConfig<96> {
  using Traits = FwdTraits<96, 128, 64, 4>;
};
template <>
struct FwdConfig<128> {
  using Traits = FwdTraits<128, 128, 64, 4>;
};
template <>
struct FwdConfig<256> {
  using Traits = FwdTraits<256, 128, 64, 8>;
};

// Hopper forward kernel (flash_fwd_sm90_kernel.cuh, sm_90a): S = Q K^T and O += P V on wgmma.
// kBlockM query rows = kBlockM / 64 warpgroups of 64 rows (16 per warp, the accumulator layout of the
// mma.sync kernel with one m16 slab), key tiles of kBlockN keys. Q, K and V tiles live in shared memory
// with the 128-byte swizzle (wgmma.cuh): a tile of R rows is D / 64 column blocks of R x 128 bytes.
//   sQ [kBlockM x D], sK [kStagesK][kBlockN x D], sV [kStagesV][kBlockN x D], key padding bits
//   (kStagesK x kBlockN / 32 words).
// Q and K are the K-major operands of S; V is the MN-major B operand of O += P V, P in registers.
// kOverlap: the softmax of tile n runs while the MMAs of O += P V of tile n + 1 run (the two products
// of an iteration are issued together), with K tiles in a 2-stage ring and V tiles in a 2-stage ring
// (kStagesV = 2) or in one buffer refilled once P V has read it (kStagesV = 1, less shared memory).
// kTma: K and V tiles come by bulk tensor copies (tma.cuh) that one thread issues, each stage with its
// mbarrier, instead of cp.async from every thread (overlapped schedule only).
template <int kHeadDim_, int kBlockM_, int kBlockN_, bool kOverlap_ = false, int kStagesV_ = (kOverlap_ ? 2 : 1),
          int kMinBlocks_ = 1, bool kTma_ = false, bool kPinSoftmax_ = false, bool kFoldScale_ = false,
          bool kLateRescale_ = false, int kEmulateExpEvery_ = 0, bool kLastWarpLoads_ = false,
          bool kPingPong_ = false, bool kPersistent_ = false, bool kEarlyTurn_ = false,
          bool kWgEpilogue_ = false, bool kPrefetchNext_ = false, bool kTmaStoreO_ = false,
          bool kLateFirstCopies_ = false, bool kUniformKeyIndex_ = false, bool kPrefetchQ_ = false,
          bool kFreshBarriers_ = false, bool kWarpSpec_ = false>
struct FwdSm90Traits {
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__: blocks per SM the registers must allow
  static constexpr bool kTma = kTma_;
  // kPinSoftmax (overlapped schedule): the softmax of S(n) is made to finish before the wait for
  // O += P V(n + 1), so that it runs under that MMA (otherwise ptxas places the wait ahead of the row max,
  // the exponentials and the row sums: sm90::keep_above_wait).
  static constexpr bool kPinSoftmax = kPinSoftmax_;
  // kFoldScale: S stays unscaled and the softmax scale goes into the exponential's FFMA (one multiply per
  // score less); needs scale > 0, so run_fwd_sm90 hands other scales to the mma.sync kernel.
  static constexpr bool kFoldScale = kFoldScale_;
  // kLateRescale: O *= alpha of tile n + 1 right after S(n) is issued (under it) instead of after the wait
  // for P V(n + 2), where it delayed the issue of the next products.
  static constexpr bool kLateRescale = kLateRescale_;
  // kEmulateExpEvery > 0: the exponentials of every kEmulateExpEvery-th n8 fragment of S are computed on the
  // FMA pipe (exp2_on_fma) instead of the MUFU unit.
  static constexpr int kEmulateExpEvery = kEmulateExpEvery_;
  // kLastWarpLoads (two warpgroups, TMA, two K and two V stages): no block barrier in the key loop. Each warp
  // counts itself off a stage once its MMAs have read it; the warp that completes the count issues the copy
  // of the next tile into that stage. Key padding bits are kept per warpgroup, under a warpgroup barrier.
  static constexpr bool kLastWarpLoads = kLastWarpLoads_;
  // kPingPong (with kLastWarpLoads): the two warpgroups take turns issuing their MMAs (two named barriers
  // pass the turn), so that one warpgroup's softmax runs while the other's MMAs hold the tensor cores.
  static constexpr bool kPingPong = kPingPong_;
  // kPersistent (with kLastWarpLoads): one block per SM walks query tiles in a fixed order (run_fwd_sm90's grid;
  // causal: the longest and the shortest tile of a head in turn, so that every block gets the same work). Once
  // a tile's O is staged (in a buffer of its own, sO), the block issues the next tile's Q, K and V copies, then
  // writes O out: the next tile's first copies land under this tile's output stores.
  static constexpr bool kPersistent = kPersistent_;
  // kEarlyTurn (with kPingPong): the last warpgroup passes the first turn as soon as its first S is issued,
  // not after its first softmax, so that warpgroup 0's first products do not wait for that softmax.
  static constexpr bool kEarlyTurn = kEarlyTurn_;
  // kWgEpilogue (with kPingPong, not kPersistent): each warpgroup stages O in its own rows of the Q buffer and
  // stores them behind a warpgroup barrier instead of a block barrier.
  static constexpr bool kWgEpilogue = kWgEpilogue_;
  // kPrefetchNext (not kPersistent): each block has the block one wave on (its linear index plus num_sms *
  // kMinBlocks) fetch its Q tile and first K and V tiles into L2, so that block's first copies hit L2.
  static constexpr bool kPrefetchNext = kPrefetchNext_;
  // kTmaStoreO (with kWgEpilogue): one thread of each warpgroup stores its staged rows of O with bulk tensor
  // copies (a tensor map of the output) instead of 16-byte stores from every thread.
  static constexpr bool kTmaStoreO = kTmaStoreO_;
  // kLateFirstCopies (kLastWarpLoads, not kPersistent): a block's first copies are Q and K(n_last) only; the
  // first thread of the last warpgroup issues K(n_last - 1), V(n_last) and V(n_last - 1) once K(n_last) has
  // landed and its first S is issued, so that those 96 KB do not share the SM's bandwidth with the first two
  // tiles the first S waits for.
  static constexpr bool kLateFirstCopies = kLateFirstCopies_;
  // kUniformKeyIndex (kLastWarpLoads): the key loop's tile index is broadcast from lane 0 every iteration
  // (__shfl_sync), which ptxas knows to be warp-uniform: inside a persistent block's loop over tiles it otherwise
  // keeps the index on the vector path and builds the K and V descriptors there (sm90::uniform).
  static constexpr bool kUniformKeyIndex = kUniformKeyIndex_;
  // kPrefetchQ (kPersistent): two Q buffers; a tile copies the next tile's Q into the other one while its own first
  // S runs, so that the next tile does not wait for its Q (its K and V still come from this tile's epilogue).
  static constexpr bool kPrefetchQ = kPrefetchQ_;
  static constexpr int kQBuffers = kPrefetchQ ? 2 : 1;
  // kFreshBarriers (kPersistent): thread 0 invalidates and initialises the K and V stages' mbarriers again after
  // each tile (every wait on them is done by then), so that each tile starts at phase 0 and its key loop waits
  // on constant parities, as the one-tile kernels do, instead of parities carried from tile to tile. Without the
  // carried state the loop over tiles fits in 255 registers with tid and sQ left visible to the compiler, and
  // ptxas builds the descriptors as it does for one tile (kOpaqueTileRegs off).
  static constexpr bool kFreshBarriers = kFreshBarriers_;
  // kPersistent without kFreshBarriers: tid and sQ are made opaque inside the loop over tiles (otherwise 255
  // registers and spills, 17).
  static constexpr bool kOpaqueTileRegs = kPersistent_ && !kFreshBarriers;
  // kWarpSpec (the ping-pong schedule with kTmaStoreO): a producer warpgroup comes first in the block. One of its
  // threads issues every Q, K and V copy by TMA into its buffer once the computing warpgroups have released it
  // (an "empty" mbarrier per buffer, one arrival per computing warp), and gives its registers to them
  // (setmaxnreg). The block is persistent (one per SM, TileCursor's order): the producer copies the next tile's Q,
  // K and V while the computing warpgroups finish this one, and each of those stores its rows of O from a
  // buffer of its own (sO) by bulk copies, as the one-tile kernels do.
  static constexpr bool kWarpSpec = kWarpSpec_;
  // The same tiles copied by every thread with cp.async (where a tensor's strides do not suit the copy engine);
  // 192-row blocks fall back to 64-row ones (384 threads do not split a K / V tile evenly).
  using WithoutTma = FwdSm90Traits<kHeadDim_, (kBlockM_ > 128 ? 64 : kBlockM_), kBlockN_, kOverlap_, kStagesV_,
                                   kMinBlocks_, false, kPinSoftmax_, kFoldScale_, kLateRescale_, kEmulateExpEvery_,
                                   false, false>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr bool kOverlap = kOverlap_;
  static constexpr int kStagesK = kOverlap ? 2 : 1;
  static constexpr int kStagesV = kStagesV_;
  static constexpr int kNWarps = kBlockM / 16;  // the warps that compute (kWarpSpec: after the producer's)
  static constexpr int kNThreads = kNWarps * 32 + (kWarpSpec ? 128 : 0);
  static constexpr int kNFragsS = kBlockN / 8;   // n8 fragments of S per thread
  static constexpr int kNFragsO = kHeadDim / 8;  // n8 fragments of O per thread
  static constexpr int kKStepsQK = kHeadDim / 16;
  static constexpr int kKStepsPV = kBlockN / 16;
  static constexpr int kChunksPerRow = kHeadDim / 8;

  static constexpr int kTileKVBytes = kBlockN * kHeadDim * 2;  // one K or V tile
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;  // one Q buffer
  static constexpr int kOffK = kQBuffers * kQBytes;
  static constexpr int kOffV = kOffK + kStagesK * kTileKVBytes;
  static constexpr int kOffMask = kOffV + kStagesV * kTileKVBytes;
  static constexpr int kMaskWords = kBlockN / 32;  // per K stage (and, with kLastWarpLoads, warpgroup)
  static constexpr int kMaskCopies = kLastWarpLoads ? kBlockM / 64 : 1;
  static constexpr int kOffBar = kOffMask + 16 * ((kMaskCopies * kStagesK * kMaskWords * 4 + 15) / 16);  // kTma
  // kTma: one mbarrier (8 bytes) per K and per V stage ("full"; kWarpSpec: then one "empty" barrier per K and per V
  // stage, then Q's full and empty barriers); kLastWarpLoads: then one warp count (4 bytes) per stage.
  static constexpr int kNumBars = (kStagesK + kStagesV) * (kWarpSpec ? 2 : 1) + (kWarpSpec ? 2 : 0);
  static constexpr int kOffCount = kOffBar + 8 * kNumBars;
  static constexpr int kBarBytes = 8 * kNumBars + (kLastWarpLoads ? 4 * (kStagesK + kStagesV) : 0);
  static constexpr int kOffO = kOffBar + (kTma ? 16 * ((kBarBytes + 15) / 16) : 0);  // kPersistent, kWarpSpec: sO
  static constexpr int kOffOAligned = (kOffO + 1023) / 1024 * 1024;
  static constexpr int kSmemBytes = kPersistent || kWarpSpec ? kOffOAligned + kQBytes : kOffO;  // sO: one Q buffer

  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma N of O += P V: 64 or 128");
  static_assert(kBlockN == 64 || kBlockN == 128, "wgmma N of S = Q K^T: 64 or 128");
  static_assert(kBlockM % 64 == 0 && kNThreads <= 1024, "whole warpgroups of 64 rows");
  static_assert(kBlockN <= kNThreads, "one thread per key fetches the key padding byte");
  static_assert(kOffK % 1024 == 0 && kOffV % 1024 == 0, "swizzled tiles start on 1024-byte boundaries");
  static_assert(kStagesV == 2 || (kStagesV == 1 && (kOverlap || kStagesK == 1)), "1 or 2 V stages");
  static_assert(kOverlap || kStagesV == 1, "the serial schedule has one V buffer");
  static_assert(kOverlap || !(kTma || kPinSoftmax || kFoldScale || kLateRescale || kEmulateExpEvery),
                "kTma, kPinSoftmax, kFoldScale, kLateRescale and kEmulateExpEvery belong to the overlapped schedule");
  static_assert(!kLastWarpLoads || (kTma && kOverlap && kStagesV == 2 && kBlockM >= 128 && kBlockN == 128),
                "kLastWarpLoads: two or more warpgroups, TMA, the overlapped schedule with two V stages, "
                "128-key tiles");
  static_assert(!kPingPong || kLastWarpLoads, "kPingPong: two warpgroups that do not meet at block barriers");
  static_assert(!kPersistent || kLastWarpLoads, "kPersistent: the kLastWarpLoads schedule");
  static_assert(!kEarlyTurn || kPingPong, "kEarlyTurn: the ping-pong schedule");
  static_assert(!kWgEpilogue || (kPingPong && !kPersistent), "kWgEpilogue: ping-pong tiles staged in sQ");
  static_assert(!kPrefetchNext || (kTma && !kPersistent), "kPrefetchNext: TMA tiles of a grid of waves");
  static_assert(!kTmaStoreO || kWgEpilogue, "kTmaStoreO: each warpgroup's rows of O staged in sQ");
  static_assert(!kLateFirstCopies || (kLastWarpLoads && !kPersistent), "kLateFirstCopies: one tile per block");
  static_assert(!kUniformKeyIndex || kLastWarpLoads, "kUniformKeyIndex: the kLastWarpLoads key loop");
  static_assert(!kPrefetchQ || kPersistent, "kPrefetchQ: a persistent block's next tile");
  static_assert(!kFreshBarriers || kPersistent, "kFreshBarriers: a persistent block's tiles");
  static_assert(!kWarpSpec || (kPingPong && kTmaStoreO && kBlockM == 128 && !kLateFirstCopies && !kPrefetchNext),
                "kWarpSpec: two computing warpgroups on the ping-pong schedule, O stored by bulk copies");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one block on sm_90");
};

// Candidates per head dim, picked at compile time with -DFLASH_FWD_SM90_VARIANT_HDIM64=<v> (and _HDIM128);
// `FWD_TILE_KERNEL=sm90 bash scripts/gpu_check.sh fwdtiles` builds and times them against SDPA flash
// (docs/perf.md, v5-v10, has the H200 numbers; below: ratio to SDPA flash, N = 1024-16384, D = 64 / 128).
//   0: 128 x 128, 2 warpgroups that meet at the block's barriers (0.93-1.03x / 1.20-1.38x);
//   1: 64 x 128, 1 warpgroup per block, 2 blocks per SM: the blocks of an SM run their softmax and MMAs
//      out of step, which 0's shared barriers prevent (1.05-1.16x / 1.27-1.48x);
//   2: 64 x 64, 1 warpgroup per block, fewer registers for S, 2-3 blocks per SM (1.01-1.26x / 1.24-1.41x);
//   3: 128 x 128 like 0, with the softmax of a tile overlapping the P V MMAs of the previous one
//      (kOverlap; 2-stage K / V ring, 160 KB of shared memory at D = 128) (1.06-1.15x / 1.28-1.45x);
//   4: 64 x 128 like 1, overlapped (D = 64: 72 KB, 2 blocks per SM; D = 128: 144 KB, 1 block per SM)
//      (1.17-1.30x / 1.02-1.18x);
//   5: 64 x 64 like 2, overlapped (D = 128: 80 KB, 2 blocks per SM) (1.16-1.39x / 1.22-1.35x);
//   6: 64 x 128 overlapped with one V buffer (D = 128: 112 KB, 2 blocks per SM, unlike 4): the copy of
//      V(n) starts once P V(n + 1) is done and lands under S(n - 1) (1.16-1.27x / 1.34-1.41x);
//   7: 4 with registers capped for 3 blocks per SM at D = 64 (168 registers, 16-48 bytes of spills; 72 KB
//      of shared memory each), 4 itself at D = 128 (1.20-1.38x / 1.02-1.18x);
//   8: 7 at D = 64 and 6 at D = 128 with K and V copied by TMA (kTma): no per-thread copy addresses, 157-168
//      registers without spills at D = 64, 205-224 at D = 128 (1.34-1.50x / 1.35-1.49x; in the same call
//      7: 1.23-1.40x, 6: 1.35-1.49x); the default at D = 64, where 9, 10 and 11 were up to 8 % slower
//      (the exponentials bound that tile);
//   9: 8 with the softmax kept under the P V MMA (kPinSoftmax; in the SASS of 3-8 only the scaling and
//      masking of S ran there) (1.25-1.39x / 1.38-1.67x; x 0.92-0.98 / 1.01-1.11 of 8 in the same call);
//   10: 9 with the softmax scale folded into the exponential (kFoldScale); needs scale > 0, other scales
//      run the mma.sync kernel (1.29-1.46x / 1.47-1.67x; x 0.96-1.02 / 1.05-1.13 of 8): the default at
//      D = 128 until 15, since then its small-grid tiles (FwdSm90Config<128>::SmallGridTraits);
//   11: 10 with O rescaled under S(n) (kLateRescale) (1.31-1.46x / 1.44-1.72x; x 0.95-1.02 / 1.03-1.11);
//   12: the defaults (8 at D = 64, 10 at D = 128) with the exponentials of every 8th n8 fragment of S on the
//       FMA pipe (kEmulateExpEvery) (x 0.96-0.98 / 1.03-1.10 of 8 in one call: slower than 8 at D = 64, no
//       faster than 10 at D = 128);
//   13: the same with every 4th (x 0.90-0.96 / 1.00-1.06 of 8);
//   14: 128 x 128, two warpgroups sharing 2-stage K and V rings without block barriers in the key loop
//       (kLastWarpLoads), TMA, 10's softmax; one block per SM (160 KB at D = 128, up to 255 registers)
//       (x 0.83-0.94 / 0.99-1.07 of 10 in one call);
//   15: 14 with the two warpgroups taking turns on the MMAs (kPingPong, FA3's ping-pong schedule)
//       (1.18-1.31x / 1.52-1.79x; x 0.80-1.00 / 1.01-1.07 of 10 in one call): the default at D = 128 until 19;
//   16: 15 with three warpgroups per 192-row block taking turns in round robin, made for D = 64 (163-168
//       registers without spills there; 308-328 bytes of spills at D = 128) (D = 64: x 0.74-0.98 of 8 at
//       1k and 4k keys, 1.01-1.10 at 8k and 16k in one call): D = 64's long-key tiles
//       (FwdSm90Config<64>::LongKeysTraits);
//   17: 15 persistent (kPersistent): one block per SM walks its query tiles, and each tile's output stores
//       overlap the next tile's first Q, K and V copies; made for short key sequences, where a block's
//       prologue and epilogue are a large part of it (D = 128 at 1k keys: 0.88x cuDNN, docs/perf.md v22).
//       x 0.93-0.97 of 15 (D = 128; 0.96-0.97 at 1k keys): inside the loop over tiles ptxas builds the
//       key loop's MMA descriptors on the vector path, 821 instructions an iteration against 15's 761.
//   18: 15 with the first ping-pong turn passed once the last warpgroup's first S is issued (kEarlyTurn)
//       instead of after its first softmax, during which the tensor cores otherwise wait: one such wait
//       per block, worth most where a block runs few key tiles (D = 128: x 0.98-1.02 of 15, within noise);
//   19: 18 with each warpgroup storing its own rows of O behind a warpgroup barrier (kWgEpilogue), so that
//       warpgroup 0 does not wait at a block barrier for warpgroup 1's last products (D = 128, three calls:
//       x 1.01-1.06 of 15 without a mask at 0.5k-16k keys, x 0.98-1.02 causal; docs/results/
//       fwd_sm90_candidates_h200_2026-11-30.md): the default at D = 128 until 24.
//   20: 19 with each block fetching the Q tile and first K and V tiles of the block one wave on into L2
//       (kPrefetchNext): at 1k keys a block spends about a tenth of its samples before its first MMA, most
//       of it waiting for Q and K(n_last) (ncu, docs/perf.md v24). D = 128: x 1.00-1.01 of 19 at 1k keys,
//       0.95-1.00 at 4k-16k (one call);
//   21: 19 with O stored by bulk tensor copies, one thread per warpgroup (kTmaStoreO): the per-thread stores
//       and their address math were most of the 7 % of samples after the last MMA (same profile). D = 128:
//       x 1.01-1.03 of 19 at 1k keys, 0.96-1.00 at 4k-16k (same call);
//   22: 20 and 21 together: x 1.01-1.02 at 1k keys, 0.96-1.01 at 4k-16k (same call); timed in turn with 19,
//       1.03-1.04 at 0.5k keys, 0.99-1.03 at 1k-2k (docs/results/fwd_sm90_candidates_h200_2026-11-30.md).
//   23: 19 with a block's copies of K(n_last - 1), V(n_last) and V(n_last - 1) issued once K(n_last) has landed
//       (kLateFirstCopies), so that its first S waits for 64 KB instead of 160 KB where the copies share
//       the SM's bandwidth (D = 128, timed in turn with 19: x 1.00-1.03 at 1k keys, 0.98-1.03 at 4k);
//   24: 23 with 21's output stores (kTmaStoreO): the default at D = 128 until 30 (docs/perf.md v24). Timed in turn with
//       19 on two machine starts: x 1.01-1.04 at 1k keys (every round), 0.99-1.01 at 4k and 16k (means of the
//       second start's three rounds; single rounds 0.98-1.02).
//   25: 17 with the key loop's tile index broadcast from lane 0 every iteration (kUniformKeyIndex): ptxas then
//       builds the K and V descriptors on the uniform path inside the loop over tiles, as it does for 19: key
//       loop 783 / 852 / 827 / 877 instructions (no mask, padding, causal, both) against 17's 821 / 898 / 855 /
//       923 and 19's 761 / 849 / 792 / 865; 216-233 registers, no spills. In one call against 24: D = 128
//       x 0.92-0.99 (0.95-0.99 at 1k keys), D = 64 0.89-0.94. At 16k keys (ncu) its tiles spread unevenly over
//       the SMs (tensor pipe 57-65 % per SM against 24's 67-72 %) and its warpgroups wait 1.4x as long at the
//       turn's named barrier (docs/perf.md v25).
//   26: 25 with the next tile's Q copied into a second Q buffer while a tile's first S runs (kPrefetchQ; 225 KB
//       of shared memory at D = 128): a block's wait for Q was 3.7 % of its samples at 1k keys (19, ncu,
//       docs/perf.md v24), and 17 issued that copy only in the epilogue. In one call against 24: D = 128
//       x 0.88-0.99, D = 64 0.87-0.96 (the same call as 25's numbers).
//   27: 16 (three warpgroups, 192-row blocks; D = 64's long-key tiles) with 24's additions: the first turn
//       passed early, each warpgroup storing its own rows of O by bulk tensor copies, a block's other first
//       copies issued once its first K tile has landed. Made for D = 64, where 16 lost to 8 below 6k keys
//       (v16) and 24's additions were worth 1-6 % to 15's tiles at D = 128; 160-168 registers, no spills, key
//       loops 655 / 749 / 696 / 794 instructions (16: 650 / 738 / 690 / 783). D = 64, timed in turn twice:
//       x 1.006-1.022 of 16 at 1k-16k keys; against 8 0.75-0.83 at 1k, 0.97-1.03 at 4k, 1.03-1.12 at 16k
//       (docs/results/fwd_sm90_candidates_h200_2026-11-30.md): D = 64's long-key tiles since v26.
//   28: 25 with fresh barriers for every tile (kFreshBarriers): the key loop's waits take constant parities, and
//       tid and sQ stay visible to the compiler. Key loop 734 / 825 / 773 / 860 instructions (no mask, padding,
//       causal, both) against 25's 770 / 833 / 812 / 856 and 24's 724 / 807 / 763 / 825; 255 registers, no
//       spills (D = 128). Timed in turn with 24 (D = 128): x 0.88-0.95, 0.92 at 1k keys;
//   29: 28 with the first turn passed early (kEarlyTurn), as 18-24 have it: x 0.90-0.97 of 24, 0.92-0.94 at 1k
//       keys (docs/results/fwd_sm90_candidates_h200_2026-11-30.md). With a key loop as lean as 24's, the
//       persistent kernels still lose (docs/perf.md v26).
//   30: 24's key loop and epilogue in a persistent block with a producer warpgroup (kWarpSpec, the schedule of
//       FA3 and cuDNN): one thread of a third warpgroup issues every copy, the next tile's Q, K and V while the
//       two computing warpgroups finish this one, which then store their rows of O from a buffer of their own.
//       Made for the D = 128 forward at 1k-2k keys (0.91-0.93x cuDNN in v26), where 24's blocks spend a sixth of
//       their time before their first and after their last MMA and nothing overlaps it. Key loop 681 / 749 / 719
//       / 782 instructions (no mask, padding, causal, both; 24: 724 / 807 / 763 / 825), up to 236 registers in
//       the computing warpgroups, none spilled. Timed in turn with 24 twice (D = 128): x 1.09 at 1k keys, 1.05
//       at 2k, 1.02-1.04 at 4k-16k without a mask, x 1.06-1.15 causal (one reading 0.98 at 16k); at D = 64 x
//       1.00-1.06 of 8 at 2k-4k keys in turn, but x 0.90-0.91 at 512 keys in a grid with it as D = 64's default
//       (docs/perf.md v27): the default at D = 128; 8 stays D = 64's.
template <int kHeadDim, int kVariant>
struct FwdSm90Variant {
  static_assert(kVariant >= 0 && kVariant <= 30, "no wgmma forward variant with this number");
  static constexpr int kEmulateExpEvery = kVariant == 12 ? 8 : (kVariant == 13 ? 4 : 0);
  static constexpr bool kPrefetchQ = kVariant == 26;
  static constexpr bool kFreshBarriers = kVariant == 28 || kVariant == 29;
  static constexpr bool kWarpSpec = kVariant == 30;
  static constexpr bool kPersistent = kVariant == 17 || kVariant == 25 || kPrefetchQ || kFreshBarriers;
  static constexpr bool kUniformKeyIndex = kVariant == 25 || kPrefetchQ || kFreshBarriers || kWarpSpec;
  static constexpr bool kPrefetchNext = kVariant == 20 || kVariant == 22;
  static constexpr bool kTmaStoreO = kVariant == 21 || kVariant == 22 || kVariant == 24 || kVariant == 27 || kWarpSpec;
  static constexpr bool kLateFirstCopies = kVariant == 23 || kVariant == 24 || kVariant == 27;
  static constexpr bool kWgEpilogue = kVariant == 19 || kPrefetchNext || kTmaStoreO || kLateFirstCopies;
  static constexpr bool kEarlyTurn = kVariant == 18 || kVariant == 29 || kWgEpilogue;
  static constexpr bool kPingPong = kVariant == 15 || kVariant == 16 || kPersistent || kEarlyTurn;
  static constexpr bool kLastWarpLoads = kVariant == 14 || kPingPong;
  // The candidate whose flags 12-15 take over.
  static constexpr int kFlags = kLastWarpLoads ? 10 : (kEmulateExpEvery ? (kHeadDim == 64 ? 8 : 10) : kVariant);
  static constexpr bool kTma = kFlags >= 8;
  static constexpr bool kPinSoftmax = kFlags >= 9;
  static constexpr bool kFoldScale = kFlags >= 10;
  static constexpr bool kLateRescale = kFlags == 11;
  // Variants 8-13 are variant 7 (D = 64) or 6 (D = 128) with TMA copies; 14 and 15 have the tiles of 3.
  static constexpr int kBase = kLastWarpLoads ? 3 : (kTma ? (kHeadDim == 64 ? 7 : 6) : kVariant);
  static constexpr int kShape = kBase >= 6 ? 1 : kBase % 3;  // 0: 128 x 128, 1: 64 x 128, 2: 64 x 64
  static constexpr bool kOverlap = kBase >= 3;
  static constexpr bool kThreeWarpgroups = kVariant == 16 || kVariant == 27;  // 192-row blocks
  using Traits = FwdSm90Traits<kHeadDim, kThreeWarpgroups ? 192 : (kShape == 0 ? 128 : 64), kShape == 2 ? 64 : 128,
                               kOverlap, kBase == 6 ? 1 : (kOverlap ? 2 : 1), kBase == 7 && kHeadDim == 64 ? 3 : 1,
                               kTma, kPinSoftmax, kFoldScale, kLateRescale, kEmulateExpEvery, kLastWarpLoads,
                               kPingPong, kPersistent, kEarlyTurn, kWgEpilogue, kPrefetchNext, kTmaStoreO,
                               kLateFirstCopies, kUniformKeyIndex, kPrefetchQ, kFreshBarriers, kWarpSpec>;
};
#ifndef FLASH_FWD_SM90_VARIANT_HDIM64
#define FLASH_FWD_SM90_VARIANT_HDIM64 8
#endif
#ifndef FLASH_FWD_SM90_VARIANT_HDIM128
#define FLASH_FWD_SM90_VARIANT_HDIM128 30
#endif

// Traits: the head dim's default. SmallGridTraits: the kernel for grids too small for the default's blocks
// (at most half of the SMs busy, see flash_fwd_api.cpp): candidate kSmallGrid's 64-row blocks, twice as
// many; the default itself when its blocks are 64 rows already. LongKeysTraits: the kernel for long key
// sequences whose blocks fill the GPU: candidate kLongKeys (at D = 64 27's 192-row blocks, whose longer
// prologue and epilogue pay off once each block runs through 6k keys; docs/perf.md, v16 and v25).
template <int kHeadDim, int kVariant, int kSmallGrid, int kLongKeys>
struct FwdSm90Choice {
  using Traits = typename FwdSm90Variant<kHeadDim, kVariant>::Traits;
  using SmallGridTraits = std::conditional_t<Traits::kBlockM == 64, Traits,
                                             typename FwdSm90Variant<kHeadDim, kSmallGrid>::Traits>;
  using LongKeysTraits = typename FwdSm90Variant<kHeadDim, kLongKeys>::Traits;
  static_assert(SmallGridTraits::kBlockM == 64, "the small-grid kernel has 64-row blocks");
};
#ifndef FLASH_FWD_SM90_LONG_KEYS_VARIANT_HDIM64
#define FLASH_FWD_SM90_LONG_KEYS_VARIANT_HDIM64 27
#endif
template <int kHeadDim>
struct FwdSm90Config;
template <>
struct FwdSm90Config<64>
    : FwdSm90Choice<64, FLASH_FWD_SM90_VARIANT_HDIM64, 8, FLASH_FWD_SM90_LONG_KEYS_VARIANT_HDIM64> {};
template <>
struct FwdSm90Config<128>
    : FwdSm90Choice<128, FLASH_FWD_SM90_VARIANT_HDIM128, 10, FLASH_FWD_SM90_VARIANT_HDIM128> {};

// Split-KV forward kernel (flash_fwd_split_kernel.cuh), made for decoding: few query rows, many keys.
//
// A block computes kBlockM = 16 packed rows (the query heads of one key/value head times the queries,
// see the kernel) against the key tiles of one split. Every warp owns all 16 rows and its own kWarpN
// keys of each kBlockN-key tile (warp w: keys [w * kWarpN, (w + 1) * kWarpN) of the tile), so the
// warps run independent online softmaxes that are combined once at the end through shared memory.
// K/V tiles go through a kStages-deep cp.async ring; decoding is memory-bound, so the ring is what
// keeps enough bytes in flight.
//
// Shared memory (dynamic), 16-bit elements, rows padded by 8 elements as in FwdTraits:
//   sQ [16][kSmemPitch], then kStages x (sK [kBlockN][kSmemPitch], sV [kBlockN][kSmemPitch]);
// after the key loop the same bytes hold the fp32 partial outputs of the warps,
//   sO [kNWarps][16][kOPitch] (kOPitch = D + 8 floats: conflict-free float2 stores).
template <int kHeadDim_, int kBlockN_, int kStages_>
struct SplitTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 16;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = kNWarps * 32;

  static constexpr int kWarpN = kBlockN / kNWarps;  // keys of a tile per warp
  static constexpr int kNFragsS = kWarpN / 8;       // n8 fragments of a warp's S
  static constexpr int kNFragsO = kHeadDim / 8;     // n8 fragments of O
  static constexpr int kKStepsQK = kHeadDim / 16;   // k16 steps of Q K^T
  static constexpr int kKStepsPV = kWarpN / 16;     // k16 steps of P V

  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kSmemPitch = kHeadDim + 8;
  static constexpr int kElemBytes = 2;

  static constexpr int kSmemQBytes = kBlockM * kSmemPitch * kElemBytes;
  static constexpr int kSmemKVElems = kBlockN * kSmemPitch;                 // one K or V tile
  static constexpr int kSmemStageBytes = 2 * kSmemKVElems * kElemBytes;    // K and V of one stage
  static constexpr int kSmemLoopBytes = kSmemQBytes + kStages * kSmemStageBytes;
  static constexpr int kOPitch = kHeadDim + 8;
  static constexpr int kSmemCombineBytes = kNWarps * kBlockM * kOPitch * 4;
  static constexpr int kSmemBytes = kSmemLoopBytes > kSmemCombineBytes ? kSmemLoopBytes : kSmemCombineBytes;

  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of 16");
  static_assert(kWarpN % 16 == 0 && kWarpN <= 32, "a warp takes 16 or 32 keys (one ballot word) per tile");
  static_assert(kNFragsO % 2 == 0 && kNFragsS % 2 == 0, "ldmatrix.x4 loads two n8 fragments");
  static_assert(kStages >= 2, "the copy of the next tile overlaps the math of this one");
  static_assert(kSmemQBytes % 16 == 0 && kSmemStageBytes % 16 == 0, "16-byte aligned tiles");
};

// Per head dim choice: 128-key tiles for D <= 64, 64-key tiles above; three stages where two blocks
// still fit an SM (227 KiB on sm_90), two for D = 256 (140 KiB: one block, also within sm_80's 163 KiB).
template <int kHeadDim>
struct SplitConfig;
template <>
struct SplitConfig<32> {
  using Traits = SplitTraits<32, 128, 3>;
};
template <>
struct SplitConfig<64> {
  using Traits = SplitTraits<64, 128, 3>;
};
template <>
struct SplitConfig<96> {
  using Traits = SplitTraits<96, 64, 3>;
};
template <>
struct SplitConfig<128> {
  using Traits = SplitTraits<128, 64, 3>;
};
template <>
struct SplitConfig<256> {
  using Traits = SplitTraits<256, 64, 2>;
};

}  // namespace flash
