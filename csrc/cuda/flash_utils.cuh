// Device helpers shared by the flash attention kernels (sm_80 and later): tensor-core MMA,
// ldmatrix, cp.async, fp32 <-> half/bf16 packing, exp2 and quad/warp reductions.
// Plain CUDA: no torch headers.
//
// Fragment layouts of mma.sync.m16n8k16.row.col (g = lane / 4, t = lane % 4):
//   A (16x16, row major), 4 x b32 regs, each a pair of consecutive columns:
//     a0: (row g,   cols 2t, 2t+1)     a1: (row g+8, cols 2t, 2t+1)
//     a2: (row g,   cols 2t+8, 2t+9)   a3: (row g+8, cols 2t+8, 2t+9)
//   B (16x8, k x n), 2 x b32 regs, each a pair of consecutive k:
//     b0: (k 2t, 2t+1; col g)          b1: (k 2t+8, 2t+9; col g)
//   C/D (16x8 fp32), 4 floats:
//     c0, c1: (row g, cols 2t, 2t+1)   c2, c3: (row g+8, cols 2t, 2t+1)
// A row of an accumulator is spread over the 4 lanes of a quad (lanes 4g..4g+3): row reductions
// use quad_allreduce_* (shuffle xor 1 and 2).
//
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the 16-byte row addresses of matrix
// i, and register i of every lane receives matrix i in the "a pair of consecutive columns of row
// lane/4" layout above (or, with .trans, of the transposed matrix). So:
//   - A operand from a row-major [m][k] tile: lane l points at row (l % 16), col k0 + (l / 16) * 8.
//   - B operand of X * Y^T from a row-major [n][k] tile (e.g. K for Q K^T), two n8 fragments:
//     lane l points at row n0 + (l / 16) * 8 + l % 8, col k0 + ((l / 8) % 2) * 8; registers
//     {r0, r1} are (b0, b1) of cols n0..n0+7 and {r2, r3} of cols n0+8..n0+15.
//   - B operand of X * Y from a row-major [k][n] tile (e.g. V for P V) with .trans, two n8
//     fragments: lane l points at row k0 + ((l / 8) % 2) * 8 + l % 8, col n0 + (l / 16) * 8;
//     registers as in the previous case.
// Each of the 8 addresses of one matrix must hit distinct 16-byte bank groups (mod 128 bytes) for
// a conflict-free load: the kernels pad smem rows by 16 bytes (row pitch = 16 * odd bytes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace flash {

// ---------------------------------------------------------------------------------------------
// Element type traits: __half and __nv_bfloat16.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct ElemTraits;

template <>
struct ElemTraits<__half> {
  using T2 = __half2;
  static constexpr bool kIsBF16 = false;
  // Packs (lo, hi) into one b32 register: lo in the low 16 bits (the lower column / k index).
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct ElemTraits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr bool kIsBF16 = true;
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float2 unpack(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// ---------------------------------------------------------------------------------------------
// Tensor-core MMA: D = A * B + C, m16n8k16, fp32 accumulate, in place on acc (C = D = acc).
// ---------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// Shared memory addresses and ldmatrix.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices (see the layout notes at the top).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Two 8x8 matrices: lanes 0..15 give the addresses (lanes 16..31 are ignored but must be valid).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// ---------------------------------------------------------------------------------------------
// cp.async (global -> shared, 16 bytes, L2 only). With pred false the 16 destination bytes are
// zero-filled and nothing is read (src must still be a valid-looking address: pass the tensor
// base). Group the copies with cp_async_commit(); cp_async_wait<N>() waits until at most N of
// this thread's groups are pending (follow it by __syncthreads() before other threads read).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// Math and reductions.
// ---------------------------------------------------------------------------------------------
// 2^x with the hardware approximation (independent of --use_fast_math); exp2(-inf) = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 2^x for x <= 0 without the MUFU unit (16 results per cycle and SM): x = n + f with n = round(x) and
// |f| <= 1/2, 2^f by a cubic with p(0) = 1 (coefficients fitted for the least maximum relative error on
// [-1/2, 1/2]: 1.02e-4, a fortieth of bf16's half ulp), 2^n added to its exponent bits. Six FMA-pipe and
// three integer/compare instructions. x <= -127 (a masked score: -inf) gives exactly +0. Used by forward
// candidates 12 and 13 only (on the H200 sharing the exponentials this way was slower: docs/perf.md, v10).
__device__ __forceinline__ float exp2_on_fma(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound holds round(x) in its low mantissa bits
  x = fmaxf(x, -127.f);
  const float j = __fadd_rn(x, kRound);
  const float f = __fsub_rn(x, __fsub_rn(j, kRound));
  float p = fmaf(0.0550089143f, f, 0.242210999f);
  p = fmaf(p, f, 0.693282962f);
  p = fmaf(p, f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(j) << 23));
}

// Reductions over the 4 lanes of a quad (one accumulator row), result in every lane of the quad.
__device__ __forceinline__ float quad_allreduce_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

__device__ __forceinline__ float quad_allreduce_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// Reductions over the whole warp, result in every lane.
__device__ __forceinline__ float warp_allreduce_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_allreduce_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace flash
