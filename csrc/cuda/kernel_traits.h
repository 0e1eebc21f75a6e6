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

namespace flash {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;

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
template <int kHeadDim>
struct FwdConfig;
template <>
struct FwdConfig<32> {
  using Traits = FwdTraits<32, 128, 128, 4>;
};
template <>
struct FwdConfig<64> {
  using Traits = FwdTraits<64, 128, 64, 4>;
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

}  // namespace flash
