// Tile configuration of the backward kernel per head dim (sm_80 / sm_90 with mma.sync).
//
// A block owns kBlockN keys of one (batch, query head) and loops over query tiles of kBlockM
// rows. Per query tile it computes
//   S^T = K Q^T, dP^T = V dO^T   (kBlockN x kBlockM): warps on a kKeyWarps x kSQWarps grid,
//                                 16 keys x kSCols queries each;
//   dV += P^T dO, dK += dS^T Q   (kBlockN x D): the same warp grid, 16 keys x kKVCols dims each,
//                                 fp32 in registers for the whole loop;
//   dQ  = dS K                    (kBlockM x D): kQWarpsM x kQWarpsD warps, added to dq_accum.
// With kSQWarps == 1 a warp's P^T and dS^T rows are exactly the A operand rows of its dV / dK
// tile, so they stay in registers (kPInRegs); otherwise P^T goes through shared memory too.
//
// Shared memory (dynamic), row-major tiles of 16-bit elements, rows padded by 8 elements
// (pitch = 16 * odd bytes: ldmatrix and the fragment stores are bank-conflict free):
//   sK, sV  [kBlockN][D + 8]         (reused to stage dK, dV for 16-byte global stores)
//   sQ, sdO [2][kBlockM][D + 8]      (double buffered over the query loop)
//   sdS     [kBlockN][kBlockM + 8]   dS^T
//   sP      [kBlockN][kBlockM + 8]   P^T (only without kPInRegs)
//   sLse, sDsum [2][kBlockM] float   lse and rowsum(dO * O) of the query tile
#pragma once

namespace flash {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kQWarpsM_, int kSChunks_ = 1,
          int kMinBlocks_ = 1>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocks = kMinBlocks_;  // blocks per SM asked of the register allocator

  // S^T / dP^T and dK / dV warp grid.
  static constexpr int kKeyWarps = kBlockN / 16;
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
  static constexpr int kOffP = kOffdS + kSTileBytes;
  static constexpr int kOffLse = kOffP + (kPInRegs ? 0 : kSTileBytes);  // 2 buffers
  static constexpr int kOffDsum = kOffLse + 2 * kBlockM * 4;            // 2 buffers
  static constexpr int kSmemBytes = kOffDsum + 2 * kBlockM * 4;

  static_assert(kHeadDim % 16 == 0 && kBlockM % 16 == 0 && kBlockN % 16 == 0, "16-multiples");
  static_assert(kNWarps % kKeyWarps == 0, "whole warp grid for S^T");
  static_assert(kSChunkCols % 16 == 0, "a chunk of S^T columns is whole k16 steps of dV / dK");
  static_assert(kKVCols % 8 == 0, "whole n8 fragments of dK / dV");
  static_assert(kNWarps % kQWarpsM == 0 && kQMT >= 1 && kQNT >= 1, "dQ warp grid");
  static_assert(kQMT * 16 * kQWarpsM == kBlockM && kQNT * 8 * kQWarpsD == kHeadDim, "dQ tiling");
  static_assert(kBlockM <= kNThreads, "one thread per query row loads lse / Dsum");
  static_assert((kBlockM * kChunksPerRow) % kNThreads == 0, "Q tile copy splits evenly");
  static_assert((kBlockN * kChunksPerRow) % kNThreads == 0, "K/V tile copy splits evenly");
};

// Per head dim choice (BwdTraits<D, kBlockM, kBlockN, warps, dQ warps along M, S^T chunks,
// blocks per SM>):
//   D = 32, 64, 96, 128: 128 keys x 64 queries, 8 warps of 16 keys (P^T, dS^T in registers);
//                        dQ on a 2 x 4 warp grid (4 x 2 for D = 32). D = 128 walks a warp's
//                        S^T in two chunks of 32 queries (dK, dV already hold 128 registers);
//                        D = 32 does too, to fit 128 registers and run 2 blocks per SM.
//   D = 256:             64 keys x 32 queries, 8 warps on 4 x 2 (each 16 keys x 128 dims of
//                        dK / dV); dQ on 1 x 8. Fits the 163 KB of an sm_80 block.
template <int kHeadDim>
struct BwdConfig;
template <>
struct BwdConfig<32> {
  using Traits = BwdTraits<32, 64, 128, 8, 4, 2, 2>;
};
template <>
struct BwdConfig<64> {
  using Traits = BwdTraits<64, 64, 128, 8, 2>;
};
template <>
struct BwdConfig<96> {
  using Traits = BwdTraits<96, 64, 128, 8, 2>;
};
template <>
struct BwdConfig<128> {
  using Traits = BwdTraits<128, 64, 128, 8, 2, 2>;
};
template <>
struct BwdConfig<256> {
  using Traits = BwdTraits<256, 32, 64, 8, 1>;
};

}  // namespace flash
