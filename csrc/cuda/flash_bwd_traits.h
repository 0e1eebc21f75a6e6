// Tile configuration of the backward kernel per head dim (sm_80 / sm_90 with mma.sync).
//
// A block owns kBlockN keys of one (batch, query head) and loops over query tiles of kBlockM
// rows. Per query tile it computes
//   S^T = K Q^T, dP^T = V dO^T   (kBlockN x kBlockM): warps on a kKeyWarps x kSQWarps grid,
//                                 kWarpKeys = 16 * kKeyMT keys x kSCols queries each;
//   dV += P^T dO, dK += dS^T Q   (kBlockN x D): the same warp grid, kWarpKeys keys x kKVCols dims
//                                 each, fp32 in registers for the whole loop;
//   dQ  = dS K                    (kBlockM x D): kQWarpsM x kQWarpsD warps, added to dq_accum.
// With kSQWarps == 1 a warp's P^T and dS^T rows are exactly the A operand rows of its dV / dK
// tile, so they stay in registers (kPInRegs); otherwise P^T goes through shared memory too.
// kKeyMT > 1 gives a warp more keys (m16 tiles of the S^T / dV / dK products): every B fragment
// loaded with ldmatrix then feeds kKeyMT MMAs, the lever against shared-memory bandwidth.
//
// Options of the query loop:
//   kDeferDq: dQ of query tile m is computed after the barrier of tile m + 1, from a second dS^T
//             buffer, so each query tile needs one __syncthreads instead of two (kPInRegs only);
//   kStagger: key block n walks its query tiles starting at tile (n mod count), so that the blocks
//             of one head add into different dq_accum rows at the same time;
//   kDqMode:  how dQ is added to dq_accum (whose rows are padded to kDqAccumRowMultiple):
//             kDqRowsGuarded: row-major, one guarded atomic per row (fewest registers);
//             kDqRowsUnguarded: row-major, no row guards, constant offsets from one address (sm_90;
//               sm_80 keeps the guarded form);
//             kDqFragments: dq_accum in mma fragment order, so that the 32 lanes of one float2 atomic
//               cover 256 contiguous bytes (2 L2 requests instead of 8 for a row-major 8 x 32 B
//               pattern); bwd_convert_dq_kernel reads it back in that order.
//
// Shared memory (dynamic), row-major tiles of 16-bit elements, rows padded by 8 elements
// (pitch = 16 * odd bytes: ldmatrix and the fragment stores are bank-conflict free):
//   sK, sV  [kBlockN][D + 8]         (reused to stage dK, dV for 16-byte global stores)
//   sQ, sdO [2][kBlockM][D + 8]      (double buffered over the query loop)
//   sdS     [kBlockN][kBlockM + 8]   dS^T (two buffers with kDeferDq)
//   sP      [kBlockN][kBlockM + 8]   P^T (only without kPInRegs)
//   sLse, sDsum [2][kBlockM] float   lse and rowsum(dO * O) of the query tile
//
// The tile choice per head dim is a list of variants, picked at compile time with
// -DFLASH_BWD_VARIANT_HDIM64=<v> (and _HDIM128, _HDIM256); the defaults are the sweep's winners on
// the H200 (docs/perf.md), variant 0 the fallback for devices with less shared memory per block.
#pragma once

#include "flash_params.h"  // kDqAccumRowMultiple

namespace flash {

// How the backward adds dQ into dq_accum (BwdTraits::kDqMode, below).
enum BwdDqMode : int { kDqRowsGuarded = 0, kDqRowsUnguarded = 1, kDqFragments = 2 };

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kQWarpsM_, int kSChunks_ = 1,
          int kMinBlocks_ = 1, int kKeyMT_ = 1, bool kDeferDq_ = false, bool kStagger_ = false,
          int kDqMode_ = kDqRowsGuarded>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocks = kMinBlocks_;  // blocks per SM asked of the register allocator

  // S^T / dP^T and dK / dV warp grid.
  static constexpr int kKeyMT = kKeyMT_;            // m16 tiles of keys per warp
  static constexpr int kWarpKeys = 16 * kKeyMT;
  static constexpr int kKeyWarps = kBlockN / kWarpKeys;
  static constexpr int kSQWarps = kNWarps / kKeyWarps;
  static constexpr int kSCols = kBlockM / kSQWarps;
  // A warp walks its kSCols columns in kSChunks chunks (fewer live registers), kSNT n8
  // fragments of S^T and dP^T each.
  static constexpr int kSChunks = kSChunks_;
  static constexpr int kSChunkCols = kSCols / kSChunks;
  static constexpr int kSNT = kSChunkCols / 8;
  static constexpr int kKVCols = kHeadDim / kSQWarps;
  static constexpr int kKVNT = kKVCols / 8;         // n8 fragments of dK, dV per warp
  static constexpr bool kPInRegs = kSQWarps == 1;
  static constexpr bool kDeferDq = kDeferDq_;
  static constexpr bool kStagger = kStagger_;
  static constexpr int kDqMode = kDqMode_;

  // dQ warp grid.
  static constexpr int kQWarpsM = kQWarpsM_;
  static constexpr int kQWarpsD = kNWarps / kQWarpsM;
  static constexpr int kQMT = kBlockM / kQWarpsM / 16;
  static constexpr int kQNT = kHeadDim / kQWarpsD / 8;

  static constexpr int kPitchD = kHeadDim + 8;
  static constexpr int kPitchM = kBlockM + 8;
  static constexpr int kChunksPerRow = kHeadDim / 8;

  // Shared memory layout in bytes.
  static constexpr int kKVTileBytes = kBlockN * kPitchD * 2;
  static constexpr int kQTileBytes = kBlockM * kPitchD * 2;
  static constexpr int kSTileBytes = kBlockN * kPitchM * 2;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKVTileBytes;
  static constexpr int kOffQ = kOffV + kKVTileBytes;         // 2 buffers
  static constexpr int kOffdO = kOffQ + 2 * kQTileBytes;     // 2 buffers
  static constexpr int kOffdS = kOffdO + 2 * kQTileBytes;
  static constexpr int kOffP = kOffdS + (kDeferDq ? 2 : 1) * kSTileBytes;
  static constexpr int kOffLse = kOffP + (kPInRegs ? 0 : kSTileBytes);  // 2 buffers
  static constexpr int kOffDsum = kOffLse + 2 * kBlockM * 4;            // 2 buffers
  static constexpr int kSmemBytes = kOffDsum + 2 * kBlockM * 4;

  static_assert(kHeadDim % 16 == 0 && kBlockM % 16 == 0 && kBlockN % 16 == 0, "16-multiples");
  static_assert(kKeyMT >= 1 && kBlockN % kWarpKeys == 0, "whole warps of keys");
  static_assert(kNWarps % kKeyWarps == 0, "whole warp grid for S^T");
  static_assert(kSCols * kSQWarps == kBlockM && kSChunkCols * kSChunks == kSCols, "S^T column split");
  static_assert(!kDeferDq || kPInRegs, "deferred dQ needs P^T and dS^T in registers (one barrier)");
  static_assert(kSChunkCols % 16 == 0, "a chunk of S^T columns is whole k16 steps of dV / dK");
  static_assert(kKVCols % 8 == 0, "whole n8 fragments of dK / dV");
  static_assert(kNWarps % kQWarpsM == 0 && kQMT >= 1 && kQNT >= 1, "dQ warp grid");
  static_assert(kQMT * 16 * kQWarpsM == kBlockM && kQNT * 8 * kQWarpsD == kHeadDim, "dQ tiling");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one block on sm_90");
  static_assert(kBlockM <= kNThreads, "one thread per query row loads lse / Dsum");
  static_assert(kDqMode == kDqRowsGuarded || kDqAccumRowMultiple % kBlockM == 0,
                "dq_accum rows padded to whole tiles");
  static_assert((kBlockM * kChunksPerRow) % kNThreads == 0, "Q tile copy splits evenly");
  static_assert((kBlockN * kChunksPerRow) % kNThreads == 0, "K/V tile copy splits evenly");
};

// Variants per head dim: BwdTraits<D, kBlockM, kBlockN, warps, dQ warps along M, S^T chunks,
// blocks per SM, key m16 tiles per warp, deferred dQ, staggered query order, dQ mode>. The comment after
// each is its label in the sweep (benchmarks/bwd_sweep.py reads these lines): kBlockM x kBlockN,
// the warp tile of S^T / dK / dV, and "(sm_90)" where the shared memory exceeds sm_80's 163 KB
// (bwd_kernel compiles to a trap there; the launch fails).
//   D = 32, 96: 128 keys x 64 queries, 8 warps of 16 keys (P^T, dS^T in registers); dQ on a
//               2 x 4 warp grid (4 x 2 for D = 32). D = 32 walks a warp's S^T in two chunks of
//               32 queries, to fit 128 registers and run 2 blocks per SM.
//   D = 64, 128, 256: the variants below (default 7, 8, 3; variant 0 is the fallback); see
//               docs/perf.md for the others and their measurements.
template <int kHeadDim, int kVariant>
struct BwdVariant {
  static_assert(kVariant < 0, "no backward tile variant with this number for this head dim");
};

// D = 64. Variant 0: dQ on a 2 x 4 warp grid, P^T and dS^T in registers.
template <>
struct BwdVariant<64, 0> {  // 64x128, 8 warps x 16 keys (fallback)
  using Traits = BwdTraits<64, 64, 128, 8, 2>;
};
template <>
struct BwdVariant<64, 1> {  // 128x128, 8 warps x 16 keys, S^T in 2 chunks
  using Traits = BwdTraits<64, 128, 128, 8, 4, 2>;
};
template <>
struct BwdVariant<64, 2> {  // 128x128, 8 warps x 32 keys x 32 dims, P^T in smem (sm_90)
  using Traits = BwdTraits<64, 128, 128, 8, 4, 2, 1, 2>;
};
template <>
struct BwdVariant<64, 3> {  // 64x128, 4 warps x 32 keys, S^T in 4 chunks, 2 blocks/SM
  using Traits = BwdTraits<64, 64, 128, 4, 4, 4, 2, 2>;
};
template <>
struct BwdVariant<64, 5> {  // variant 3 with deferred dQ
  using Traits = BwdTraits<64, 64, 128, 4, 4, 4, 2, 2, true>;
};
template <>
struct BwdVariant<64, 6> {  // variant 0 with staggered query order
  using Traits = BwdTraits<64, 64, 128, 8, 2, 1, 1, 1, false, true>;
};
template <>
struct BwdVariant<64, 7> {  // variant 3 with dq_accum in fragment order (default)
  using Traits = BwdTraits<64, 64, 128, 4, 4, 4, 2, 2, false, false, kDqFragments>;
};

// D = 128. dK and dV of 16 keys x 128 dims already hold 128 registers per thread: variant 0 walks
// a warp's S^T in two chunks of 32 queries.
template <>
struct BwdVariant<128, 0> {  // 64x128, 8 warps x 16 keys, S^T in 2 chunks (fallback)
  using Traits = BwdTraits<128, 64, 128, 8, 2, 2>;
};
template <>
struct BwdVariant<128, 1> {  // 64x128, 8 warps x 32 keys x 64 dims, P^T in smem, unguarded dQ (sm_90)
  using Traits = BwdTraits<128, 64, 128, 8, 2, 1, 1, 2, false, false, kDqRowsUnguarded>;
};
template <>
struct BwdVariant<128, 2> {  // variant 1 with dQ on 4 x 2 warps (sm_90)
  using Traits = BwdTraits<128, 64, 128, 8, 4, 1, 1, 2>;
};
template <>
struct BwdVariant<128, 3> {  // variant 0 with deferred dQ (sm_90)
  using Traits = BwdTraits<128, 64, 128, 8, 2, 2, 1, 1, true>;
};
template <>
struct BwdVariant<128, 4> {  // variant 0 with deferred dQ and staggered query order (sm_90)
  using Traits = BwdTraits<128, 64, 128, 8, 2, 2, 1, 1, true, true>;
};
template <>
struct BwdVariant<128, 5> {  // 32x64, 4 warps x 32 keys x 64 dims, P^T in smem, 2 blocks/SM
  using Traits = BwdTraits<128, 32, 64, 4, 2, 1, 2, 2>;
};
template <>
struct BwdVariant<128, 7> {  // 32x128, 8 warps x 32 keys x 64 dims, P^T in smem
  using Traits = BwdTraits<128, 32, 128, 8, 2, 1, 1, 2>;
};
template <>
struct BwdVariant<128, 8> {  // variant 1 with dq_accum in fragment order (sm_90) (default)
  using Traits = BwdTraits<128, 64, 128, 8, 2, 1, 1, 2, false, false, kDqFragments>;
};

// D = 256. Variant 0: 8 warps on 4 x 2 (16 keys x 128 dims of dK / dV each), dQ on 1 x 8; it fits
// the 163 KB of an sm_80 block. Variants 1 and 2 need 217 KB: sm_90 only.
template <>
struct BwdVariant<256, 0> {  // 32x64, 8 warps x 16 keys x 128 dims (fallback)
  using Traits = BwdTraits<256, 32, 64, 8, 1>;
};
template <>
struct BwdVariant<256, 1> {  // 64x64, 8 warps x 16 keys x 128 dims (sm_90)
  using Traits = BwdTraits<256, 64, 64, 8, 2>;
};
template <>
struct BwdVariant<256, 2> {  // 64x64, 8 warps x 32 keys x 64 dims (sm_90)
  using Traits = BwdTraits<256, 64, 64, 8, 4, 1, 1, 2>;
};
template <>
struct BwdVariant<256, 3> {  // variant 0 with dq_accum in fragment order (default)
  using Traits = BwdTraits<256, 32, 64, 8, 1, 1, 1, 1, false, false, kDqFragments>;
};

#ifndef FLASH_BWD_VARIANT_HDIM64
#define FLASH_BWD_VARIANT_HDIM64 7
#endif
#ifndef FLASH_BWD_VARIANT_HDIM128
#define FLASH_BWD_VARIANT_HDIM128 8
#endif
#ifndef FLASH_BWD_VARIANT_HDIM256
#define FLASH_BWD_VARIANT_HDIM256 3
#endif

// The tiles run_bwd launches per head dim: Traits where the device gives a block enough shared
// memory (every sm_90), else Fallback (variant 0, which fits sm_80's 163 KB). kMinSmemBytes is what
// the API layer checks against the device before launching anything. FLASH_BWD_ONE_VARIANT (the
// sweep's builds, scripts/sweep_bwd.py) drops the fallback: the selected variant is the one kernel
// that runs and that ptxas reports.
template <typename Traits_, typename Fallback_ = Traits_>
struct BwdChoice {
  using Traits = Traits_;
#ifdef FLASH_BWD_ONE_VARIANT
  using Fallback = Traits_;
#else
  using Fallback = Fallback_;
#endif
  static constexpr int kMinSmemBytes =
      Traits::kSmemBytes < Fallback::kSmemBytes ? Traits::kSmemBytes : Fallback::kSmemBytes;
};

template <int kHeadDim>
struct BwdConfig;
template <>
struct BwdConfig<32> : BwdChoice<BwdTraits<32, 64, 128, 8, 4, 2, 2>> {};
template <>
struct BwdConfig<64>
    : BwdChoice<BwdVariant<64, FLASH_BWD_VARIANT_HDIM64>::Traits, BwdVariant<64, 0>::Traits> {};
template <>
struct BwdConfig<96> : BwdChoice<BwdTraits<96, 64, 128, 8, 2>> {};
template <>
struct BwdConfig<128>
    : BwdChoice<BwdVariant<128, FLASH_BWD_VARIANT_HDIM128>::Traits, BwdVariant<128, 0>::Traits> {};
template <>
struct BwdConfig<256>
    : BwdChoice<BwdVariant<256, FLASH_BWD_VARIANT_HDIM256>::Traits, BwdVariant<256, 0>::Traits> {};

}  // namespace flash
