// Hopper (sm_90a) warpgroup MMA: shared-memory matrix descriptors and wgmma.mma_async wrappers.
//
// A warpgroup is 4 consecutive warps starting at a warp index divisible by 4; every wgmma below is issued
// by all 128 of its threads. The accumulator of m64nNk16 (fp32) is, per thread, float d[N / 8][4] in the
// same order as N / 8 mma.sync m16n8 accumulators of the thread's warp: warp w of the group owns rows
// 16 w .. 16 w + 15, d[j][0..1] = row g, columns 8 j + 2 t, +1 and d[j][2..3] = row g + 8 (g = lane / 4,
// t = lane % 4). A register A operand (k16) is the mma.sync m16n8k16 A fragment of the warp's 16 rows.
//
// Shared-memory tiles use the 128-byte swizzle: a tile of R rows x 64 elements (16-bit) is R rows of
// 128 bytes, 16-byte chunk c of row r stored at chunk c ^ (r % 8); the tile's base is 1024-byte aligned
// (the swizzle acts on address bits 4-6 xor 7-9). Wider rows are split into such 64-element column
// blocks, one after the other (swizzled_offset below).
//   K-major operand (rows = M or N, 64 K-elements per 128-byte row): stride between 8-row groups = SBO
//   (1024 bytes); the k16 steps inside a 128-byte row are +32 bytes on the start address.
//   MN-major operand (rows = K, 64 N-elements per row): 8-row groups along K at SBO (1024 bytes), the
//   next 64 N-elements (next column block) at LBO.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "flash_utils.cuh"

namespace flash {
namespace sm90 {

// Byte offset of 16-byte chunk `chunk` (8 elements) of row `row` in a swizzled tile of `rows` rows.
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk, int rows) {
  const int block = chunk / 8, c = chunk % 8;
  return uint32_t(block * rows * 128 + row * 128 + ((c ^ (row % 8)) << 4));
}

// Matrix descriptor: start address, leading / stride byte offsets, 128-byte swizzle (layout type 1).
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t desc = (smem_addr & 0x3FFFFu) >> 4;
  desc |= uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16;
  desc |= uint64_t((sbo_bytes >> 4) & 0x3FFFu) << 32;
  desc |= uint64_t(1) << 62;
  return desc;
}

// make_desc(smem_addr + bytes, ...) from make_desc(smem_addr, ...), bytes a multiple of 16: the start address
// is the low field (address >> 4, 14 bits), and shared memory addresses stay below 256 KB, so the sum never
// carries out of it. One 32-bit add on the low word, where make_desc takes an add, two masks and a shift.
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = uint32_t(desc) + (bytes >> 4);
  return (desc & ~uint64_t(0xFFFFFFFFu)) | lo;
}

// cp.async of rows [row_begin, row_begin + kRows) of one (batch, head) slice (row stride in elements)
// into a swizzled tile; rows at or past rows_valid are zero-filled and read nothing. Consecutive threads
// copy consecutive 16-byte chunks of a row (whole 32-byte sectors; conflict-free smem writes).
template <int kRows, int kHeadDim, int kThreads, typename Element>
__device__ __forceinline__ void load_tile(uint32_t smem_tile, const Element* slice, int64_t row_stride,
                                          int row_begin, int rows_valid, int tid, const void* fallback) {
  constexpr int kCpr = kHeadDim / 8;
  constexpr int kRowsPerPass = kThreads / kCpr;
  static_assert(kThreads % kCpr == 0 && kRows % kRowsPerPass == 0, "tile copy splits evenly");
  const int r0 = tid / kCpr;
  const int c = tid % kCpr;
  const Element* src = slice + static_cast<int64_t>(row_begin + r0) * row_stride + c * 8;
  const int64_t pass_stride = kRowsPerPass * row_stride;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const int r = r0 + i * kRowsPerPass;
    const bool pred = r < rows_valid;
    cp_async_16(smem_tile + swizzled_offset(r, c, kRows), pred ? static_cast<const void*>(src) : fallback, pred);
    src += pass_stride;
  }
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written through the generic proxy (st.shared, cp.async) and read next by wgmma:
// each writing thread fences before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// The 128 threads of warpgroup wg meet (named barrier 1 + wg; 0 is the block's).
__device__ __forceinline__ void warpgroup_barrier(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
}
// The threads of the MMA warpgroups (kMmaThreads, from warp 0) meet, apart from any other warpgroup (named
// barrier 3; warpgroup_barrier takes 1 and 2 in a block of two warpgroups).
template <int kThreads>
__device__ __forceinline__ void mma_warpgroups_barrier() {
  asm volatile("bar.sync 3, %0;\n" ::"n"(kThreads) : "memory");
}
// Registers per thread of this warpgroup from here on (every warp of the warpgroup executes it): a warpgroup
// that only copies gives registers back (dec), the ones that issue MMAs take them (inc).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
__device__ __forceinline__ void st_shared_f32x4(uint32_t addr, float x, float y, float z, float w) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(x), "f"(y), "f"(z), "f"(w) : "memory");
}
// Bulk reduction of `bytes` (a multiple of 16) of fp32 from shared memory into global memory (both 16-byte
// aligned): dst[i] += src[i] in L2, issued by one thread, in a bulk group of that thread (bulk_commit).
// Shared memory written through the generic proxy is fenced (fence_proxy_async) before the issue.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// This thread's bulk groups but the last N have read their shared memory (it may be written again).
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// This thread's bulk groups but the last N are complete (their global writes done).
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of an accumulator across the asynchronous MMA; also pins
// values computed before a wgmma_wait to that side of it (the compiler would otherwise sink register-only
// math below the wait, out of the MMA's shadow).
template <int NF, int E>
__device__ __forceinline__ void fence_accumulator(float (&d)[NF][E]) {
#pragma unroll
  for (int j = 0; j < NF; ++j)
#pragma unroll
    for (int e = 0; e < E; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// The same for registers of a register A operand (P): live, unchanged, until the wgmma that reads them
// has been waited for.
template <int NF>
__device__ __forceinline__ void fence_operand(uint32_t (&a)[NF][2]) {
#pragma unroll
  for (int j = 0; j < NF; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}

template <typename T>
struct WgmmaType;
template <>
struct WgmmaType<__half> {
  static constexpr bool kBf16 = false;
};
template <>
struct WgmmaType<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};

// Operand lists of the accumulator d[N / 8][4] and its register names in the instruction string.
#define FLASH_WGMMA_FRAG(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FLASH_WGMMA_OUT_N64(d)                                                                        \
  FLASH_WGMMA_FRAG(d, 0), FLASH_WGMMA_FRAG(d, 1), FLASH_WGMMA_FRAG(d, 2), FLASH_WGMMA_FRAG(d, 3),     \
      FLASH_WGMMA_FRAG(d, 4), FLASH_WGMMA_FRAG(d, 5), FLASH_WGMMA_FRAG(d, 6), FLASH_WGMMA_FRAG(d, 7)
#define FLASH_WGMMA_OUT_N128(d)                                                                       \
  FLASH_WGMMA_OUT_N64(d), FLASH_WGMMA_FRAG(d, 8), FLASH_WGMMA_FRAG(d, 9), FLASH_WGMMA_FRAG(d, 10),   \
      FLASH_WGMMA_FRAG(d, 11), FLASH_WGMMA_FRAG(d, 12), FLASH_WGMMA_FRAG(d, 13), FLASH_WGMMA_FRAG(d, 14), \
      FLASH_WGMMA_FRAG(d, 15)
#define FLASH_WGMMA_REGS_N64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FLASH_WGMMA_REGS_N128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D (64 x N) = A B (+ D when scale_d != 0), N = 64 or 128; A: K-major descriptor (64 x 16), B: K-major
// descriptor (N rows of 16 K-elements, i.e. B^T stored row-major). kTransA / kTransB: that operand is
// MN-major instead (A: 16 rows of K, 64 M-elements each; B: as in wgmma_rs), transposed on the way in.
// The instruction is written once, as a macro of the element type's PTX name TY, N, and the operand
// numbers that follow the accumulators.
template <typename T, int N, bool kTransA = false, bool kTransB = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma N of 64 or 128");
#define FLASH_WGMMA_SS(TY, NS, REGS, OUTS, A, B, P, TA, TB)                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                      \
               "wgmma.mma_async.sync.aligned.m64n" NS "k16.f32." TY "." TY " " REGS ", " A ", " B \
               ", p, 1, 1, " TA ", " TB ";\n}\n"                                                 \
               : OUTS(d)                                                                         \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(int(kTransA)), "n"(int(kTransB)))
  constexpr bool kBf16 = WgmmaType<T>::kBf16;
  if constexpr (N == 64 && kBf16) {
    FLASH_WGMMA_SS("bf16", "64", FLASH_WGMMA_REGS_N64, FLASH_WGMMA_OUT_N64, "%32", "%33", "%34", "%35", "%36");
  } else if constexpr (N == 64) {
    FLASH_WGMMA_SS("f16", "64", FLASH_WGMMA_REGS_N64, FLASH_WGMMA_OUT_N64, "%32", "%33", "%34", "%35", "%36");
  } else if constexpr (kBf16) {
    FLASH_WGMMA_SS("bf16", "128", FLASH_WGMMA_REGS_N128, FLASH_WGMMA_OUT_N128, "%64", "%65", "%66", "%67",
                   "%68");
  } else {
    FLASH_WGMMA_SS("f16", "128", FLASH_WGMMA_REGS_N128, FLASH_WGMMA_OUT_N128, "%64", "%65", "%66", "%67",
                   "%68");
  }
#undef FLASH_WGMMA_SS
}

// D (64 x N) = A B (+ D when scale_d != 0), N = 64 or 128; A: registers (the warp's m16 x k16 A
// fragment), B: MN-major descriptor (16 rows of K, N N-elements each, i.e. B stored row-major),
// transposed on the way in.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                         int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma N of 64 or 128");
#define FLASH_WGMMA_RS(TY, NS, REGS, OUTS, A, B, P)                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                      \
               "wgmma.mma_async.sync.aligned.m64n" NS "k16.f32." TY "." TY " " REGS ", " A ", " B \
               ", p, 1, 1, 1;\n}\n"                                                              \
               : OUTS(d)                                                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))
  constexpr bool kBf16 = WgmmaType<T>::kBf16;
  if constexpr (N == 64 && kBf16) {
    FLASH_WGMMA_RS("bf16", "64", FLASH_WGMMA_REGS_N64, FLASH_WGMMA_OUT_N64, "{%32, %33, %34, %35}", "%36", "%37");
  } else if constexpr (N == 64) {
    FLASH_WGMMA_RS("f16", "64", FLASH_WGMMA_REGS_N64, FLASH_WGMMA_OUT_N64, "{%32, %33, %34, %35}", "%36", "%37");
  } else if constexpr (kBf16) {
    FLASH_WGMMA_RS("bf16", "128", FLASH_WGMMA_REGS_N128, FLASH_WGMMA_OUT_N128, "{%64, %65, %66, %67}", "%68",
                   "%69");
  } else {
    FLASH_WGMMA_RS("f16", "128", FLASH_WGMMA_REGS_N128, FLASH_WGMMA_OUT_N128, "{%64, %65, %66, %67}", "%68",
                   "%69");
  }
#undef FLASH_WGMMA_RS
}

#undef FLASH_WGMMA_REGS_N128
#undef FLASH_WGMMA_REGS_N64
#undef FLASH_WGMMA_OUT_N128
#undef FLASH_WGMMA_OUT_N64
#undef FLASH_WGMMA_FRAG

}  // namespace sm90
}  // namespace flash
