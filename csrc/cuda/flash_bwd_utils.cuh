// Device helpers of the backward kernels on top of flash_utils.cuh: warp-level tensor-core GEMMs
// on shared-memory tiles, a 4-byte zero-filling cp.async and fp32 pair atomics.
// Plain CUDA: no torch headers.
//
// A warp GEMM computes acc[MT][NT] (16MT x 8NT fp32 fragments, layout C of flash_utils.cuh) +=
// A (16MT x 16KT) * B (16KT x 8NT). Operands in shared memory are given by the 32-bit shared
// address of their element (0, 0) and a row pitch in elements:
//   A, kTrans = false: stored [m][k] (element (m, k) at m * pitch + k), plain ldmatrix;
//   A, kTrans = true:  stored [k][m] (element (m, k) at k * pitch + m), ldmatrix.trans;
//   B, kTrans = false: stored [n][k] (the Y of X * Y^T), plain ldmatrix;
//   B, kTrans = true:  stored [k][n] (the Y of X * Y), ldmatrix.trans.
#pragma once

#include "flash_params.h"
#include "flash_utils.cuh"

namespace flash {

// What the backward block of keys [n0, n0 + block) of (batch b, query head h) works on: the keys of batch b
// that exist (L: seqlens_k[b] clamped to [0, Nk], else Nk), the causal offset (query i sees key j iff
// j <= i + diag), the query tiles [m_begin, m_end) of kBlockM rows that can see some key of the block, and
// the (b, h) slices of the inputs and of the scratch.
template <typename T, int kBlockM, int kHeadDim>
struct BwdBlock {
  int L, diag, m_begin, m_end;
  const T *q, *k, *v, *dout;
  const float *lse, *dsum;
  float* dq_accum;
  int64_t bh;  // b * Hq + h: the slice of dK, dV (per query head), lse, softmax_d and dq_accum

  __device__ __forceinline__ BwdBlock(const BwdParams& params, int b, int h, int n0) {
    const int Nq = params.len_q, Nk = params.len_k;
    L = Nk;
    if (params.seqlens_k != nullptr) L = min(max(params.seqlens_k[b], 0), Nk);
    diag = L - Nq;
    m_begin = 0;
    m_end = (Nq + kBlockM - 1) / kBlockM;
    if (n0 >= L) {
      m_end = 0;
    } else if (params.is_causal) {
      const int i_first = n0 - diag;  // first query that sees key n0
      if (i_first >= Nq) m_end = 0;
      else m_begin = max(i_first, 0) / kBlockM;
    }
    const int hk = h / params.group;
    q = static_cast<const T*>(params.q) + b * params.q_stride.batch + h * params.q_stride.head;
    k = static_cast<const T*>(params.k) + b * params.k_stride.batch + hk * params.k_stride.head;
    v = static_cast<const T*>(params.v) + b * params.v_stride.batch + hk * params.v_stride.head;
    dout = static_cast<const T*>(params.dout) + b * params.dout_stride.batch + h * params.dout_stride.head;
    bh = int64_t(b) * params.heads_q + h;
    lse = params.lse_saved + bh * Nq;
    dsum = params.softmax_d + bh * Nq;
    dq_accum = params.dq_accum + bh * params.dq_accum_rows * kHeadDim;
  }
};

// 4-byte cp.async; with pred false the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async_4(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_size = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_size));
}

// acc[0] += x, acc[1] += y on global memory (8-byte aligned), one vector atomic on sm_90.
__device__ __forceinline__ void atomic_add_f2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// acc[0..3] += x, y, z, w on global memory (16-byte aligned), one vector reduction on sm_90.
__device__ __forceinline__ void atomic_add_f4(float* p, float x, float y, float z, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(x, y, z, w));
#else
  atomic_add_f2(p, x, y);
  atomic_add_f2(p + 2, z, w);
#endif
}

// One A fragment (16 x 16 at (m0, k0)).
template <bool kTrans>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], uint32_t base, int pitch, int m0, int k0,
                                            int lane) {
  if constexpr (!kTrans) {
    // Matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
    const int row = m0 + (lane % 16), col = k0 + (lane / 16) * 8;
    ldmatrix_x4(a, base + (row * pitch + col) * 2);
  } else {
    // Same four matrices read from the [k][m] tile, transposed on load.
    const int row = k0 + (lane / 16) * 8 + lane % 8, col = m0 + ((lane / 8) % 2) * 8;
    ldmatrix_x4_trans(a, base + (row * pitch + col) * 2);
  }
}

// B fragments of two n8 tiles (16 x 16 at (k0, n0)): {b[0], b[1]} for cols n0..n0+7,
// {b[2], b[3]} for cols n0+8..n0+15.
template <bool kTrans>
__device__ __forceinline__ void load_b_frag_x4(uint32_t (&b)[4], uint32_t base, int pitch, int n0, int k0,
                                               int lane) {
  if constexpr (!kTrans) {
    const int row = n0 + (lane / 16) * 8 + lane % 8, col = k0 + ((lane / 8) % 2) * 8;
    ldmatrix_x4(b, base + (row * pitch + col) * 2);
  } else {
    const int row = k0 + ((lane / 8) % 2) * 8 + lane % 8, col = n0 + (lane / 16) * 8;
    ldmatrix_x4_trans(b, base + (row * pitch + col) * 2);
  }
}

// B fragment of one n8 tile (16 x 8 at (k0, n0)); lanes 16..31 repeat lanes 0..15's addresses.
template <bool kTrans>
__device__ __forceinline__ void load_b_frag_x2(uint32_t (&b)[2], uint32_t base, int pitch, int n0, int k0,
                                               int lane) {
  if constexpr (!kTrans) {
    const int row = n0 + lane % 8, col = k0 + ((lane / 8) % 2) * 8;
    ldmatrix_x2(b, base + (row * pitch + col) * 2);
  } else {
    const int row = k0 + ((lane / 8) % 2) * 8 + lane % 8, col = n0;
    ldmatrix_x2_trans(b, base + (row * pitch + col) * 2);
  }
}

// The B fragments of step kk against A fragments a[MT]: all NT n8 tiles.
template <typename T, int MT, int NT, bool kBTrans>
__device__ __forceinline__ void mma_row_of_b(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][4],
                                             uint32_t sB, int ldb, int k0, int lane) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t b[4];
    load_b_frag_x4<kBTrans>(b, sB, ldb, np * 16, k0, lane);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
      mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
    }
  }
  if constexpr (NT % 2 == 1) {
    uint32_t b[2];
    load_b_frag_x2<kBTrans>(b, sB, ldb, (NT - 1) * 8, k0, lane);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mma_16816<T>(acc[mt][NT - 1], a[mt], b[0], b[1]);
  }
}

// acc += A * B, both operands in shared memory.
template <typename T, int MT, int NT, int KT, bool kATrans, bool kBTrans>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[MT][NT][4], uint32_t sA, int lda, uint32_t sB,
                                             int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a_frag<kATrans>(a[mt], sA, lda, mt * 16, kk * 16, lane);
    mma_row_of_b<T, MT, NT, kBTrans>(acc, a, sB, ldb, kk * 16, lane);
  }
}

// acc += A * B with A (16MT x 16KT) given as fp32 accumulator fragments pa[MT][2KT] (one 16 x 8 C
// fragment per m16 tile and n8 tile of a previous product), rounded to T here; B in shared memory.
// C fragments 2kk and 2kk+1 of an m16 tile hold exactly its A fragment of step kk: (c0,c1) of 2kk
// -> a0, (c2,c3) of 2kk -> a1, (c0,c1) of 2kk+1 -> a2, (c2,c3) of 2kk+1 -> a3.
template <typename T, int MT, int NT, int KT, bool kBTrans>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[MT][NT][4], const float (&pa)[MT][2 * KT][4],
                                             uint32_t sB, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = ElemTraits<T>::pack(pa[mt][2 * kk][0], pa[mt][2 * kk][1]);
      a[mt][1] = ElemTraits<T>::pack(pa[mt][2 * kk][2], pa[mt][2 * kk][3]);
      a[mt][2] = ElemTraits<T>::pack(pa[mt][2 * kk + 1][0], pa[mt][2 * kk + 1][1]);
      a[mt][3] = ElemTraits<T>::pack(pa[mt][2 * kk + 1][2], pa[mt][2 * kk + 1][3]);
    }
    mma_row_of_b<T, MT, NT, kBTrans>(acc, a, sB, ldb, kk * 16, lane);
  }
}

// Writes a warp's fp32 fragments acc[MT][NT] (rows 16MT, cols 8NT) as T into a row-major shared
// tile at element (row0, col0) with the given pitch, optionally scaled.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_frags_smem(T* tile, int pitch, int row0, int col0,
                                                 const float (&acc)[MT][NT][4], float scale, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = row0 + mt * 16 + g, c = col0 + nt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(tile + r * pitch + c) =
          ElemTraits<T>::pack(acc[mt][nt][0] * scale, acc[mt][nt][1] * scale);
      *reinterpret_cast<uint32_t*>(tile + (r + 8) * pitch + c) =
          ElemTraits<T>::pack(acc[mt][nt][2] * scale, acc[mt][nt][3] * scale);
    }
  }
}

}  // namespace flash
