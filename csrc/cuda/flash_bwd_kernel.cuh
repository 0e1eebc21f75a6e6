// FlashAttention-2 style backward on tensor cores (mma.sync m16n8k16, fp32 accumulation) and the
// run_bwd launcher. Tile shapes and the shared memory layout: flash_bwd_traits.h.
// Plain CUDA: no torch headers.
//
// One block per (key tile, query head, batch). It keeps its K and V tiles in shared memory and dK,
// dV in fp32 registers, and loops over the query tiles that can see its keys:
//   S^T  = K Q^T                 P^T = exp2(S^T * scale_log2 - lse * log2e), 0 where masked
//   dP^T = V dO^T                dS^T = P^T o (dP^T - softmax_d)
//   dV  += P^T dO                dK  += dS^T Q                (times scale at the end)
//   dQ   = dS K  -> atomicAdd into dq_accum (fp32; scaled and rounded by bwd_convert_dq_kernel).
// Masks: key j of batch b is visible to query i iff j < L (L = seqlens_k[b] clamped to [0, Nk],
// else Nk), key_padding_mask[b, j] is false, and, if causal, j <= i + L - Nq. A row with lse = +inf
// (no visible key) gets P = 0 and contributes nothing.
#pragma once

#include <cuda_runtime.h>

#include "flash_bwd_preprocess.cuh"
#include "flash_bwd_traits.h"
#include "flash_bwd_utils.cuh"
#include "flash_launch.h"
#include "flash_params.h"
#include "flash_utils.cuh"

namespace flash {

// Rows [row0, row0 + kRows) of one (N, D) slice (row stride in elements) into a padded shared
// tile with cp.async; rows >= n_rows are zero-filled.
template <int kRows, int kHeadDim, int kPitch, int kNThreads, typename T>
__device__ __forceinline__ void load_rows_async(uint32_t stile, const T* gbase, int64_t row_stride, int row0,
                                                int n_rows, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kIters = kRows * kChunks / kNThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = it * kNThreads + tid;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = row0 + r < n_rows;
    const T* src = ok ? gbase + (row0 + r) * row_stride + c * 8 : gbase;
    cp_async_16(stile + (r * kPitch + c * 8) * 2, src, ok);
  }
}

template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocks) bwd_kernel(const BwdParams params) {
  constexpr int D = Tr::kHeadDim;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kPitchD = Tr::kPitchD;
  constexpr int kPitchM = Tr::kPitchM;
  constexpr int kNThreads = Tr::kNThreads;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int n_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int Nq = params.len_q, Nk = params.len_k, Hq = params.heads_q;
  const int hk = h / params.group;
  const bool causal = params.is_causal;

  int L = Nk;
  if (params.seqlens_k != nullptr) L = min(max(params.seqlens_k[b], 0), Nk);
  const int n0 = n_block * kBlockN;
  const int diag = L - Nq;  // causal: query i sees key j iff j <= i + diag

  // The query tiles that can see some key of this tile.
  int m_begin = 0, m_end = (Nq + kBlockM - 1) / kBlockM;
  if (n0 >= L) {
    m_end = 0;
  } else if (causal) {
    const int i_first = n0 - diag;  // first query that sees key n0
    if (i_first >= Nq) m_end = 0;
    else m_begin = max(i_first, 0) / kBlockM;
  }

  // Warp roles: kw-th 16 keys; sq-th column slab of S^T and of dK / dV; (qm, qd) tile of dQ.
  const int kw = warp % Tr::kKeyWarps, sq = warp / Tr::kKeyWarps;
  const int qm = warp % Tr::kQWarpsM, qd = warp / Tr::kQWarpsM;

  // This thread's two key rows of S^T (accumulator rows g and g + 8) and their visibility.
  const int j0 = n0 + kw * 16 + g, j1 = j0 + 8;
  bool v0 = j0 < L, v1 = j1 < L;
  if (params.key_padding_mask != nullptr) {
    const bool* kpm = params.key_padding_mask + b * params.key_padding_mask_batch_stride;
    if (v0) v0 = !kpm[j0];
    if (v1) v1 = !kpm[j1];
  }

  const T* gq = static_cast<const T*>(params.q) + b * params.q_stride.batch + h * params.q_stride.head;
  const T* gk = static_cast<const T*>(params.k) + b * params.k_stride.batch + hk * params.k_stride.head;
  const T* gv = static_cast<const T*>(params.v) + b * params.v_stride.batch + hk * params.v_stride.head;
  const T* gdo =
      static_cast<const T*>(params.dout) + b * params.dout_stride.batch + h * params.dout_stride.head;
  const int64_t bh = int64_t(b) * Hq + h;
  const float* glse = params.lse_saved + bh * Nq;
  const float* gdsum = params.softmax_d + bh * Nq;
  float* gdq = params.dq_accum + bh * Nq * D;

  const uint32_t s0 = smem_u32(smem);
  const uint32_t sK = s0 + Tr::kOffK, sV = s0 + Tr::kOffV, sdS = s0 + Tr::kOffdS, sP = s0 + Tr::kOffP;
  const float* sLse = reinterpret_cast<const float*>(smem + Tr::kOffLse);
  const float* sDsum = reinterpret_cast<const float*>(smem + Tr::kOffDsum);

  // Q, dO, lse and softmax_d of query tile m into buffer buf.
  auto load_query_tile = [&](int m, int buf) {
    const int m0 = m * kBlockM;
    load_rows_async<kBlockM, D, kPitchD, kNThreads>(s0 + Tr::kOffQ + buf * Tr::kQTileBytes, gq,
                                                    params.q_stride.row, m0, Nq, tid);
    load_rows_async<kBlockM, D, kPitchD, kNThreads>(s0 + Tr::kOffdO + buf * Tr::kQTileBytes, gdo,
                                                    params.dout_stride.row, m0, Nq, tid);
    if (tid < kBlockM) {
      const bool ok = m0 + tid < Nq;
      cp_async_4(s0 + Tr::kOffLse + (buf * kBlockM + tid) * 4, ok ? glse + m0 + tid : glse, ok);
      cp_async_4(s0 + Tr::kOffDsum + (buf * kBlockM + tid) * 4, ok ? gdsum + m0 + tid : gdsum, ok);
    }
  };

  load_rows_async<kBlockN, D, kPitchD, kNThreads>(sK, gk, params.k_stride.row, n0, Nk, tid);
  load_rows_async<kBlockN, D, kPitchD, kNThreads>(sV, gv, params.v_stride.row, n0, Nk, tid);
  if (m_begin < m_end) load_query_tile(m_begin, 0);
  cp_async_commit();

  float dk[1][Tr::kKVNT][4], dv[1][Tr::kKVNT][4];
#pragma unroll
  for (int nt = 0; nt < Tr::kKVNT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[0][nt][e] = dv[0][nt][e] = 0.f;
  }

  for (int m = m_begin; m < m_end; ++m) {
    const int buf = (m - m_begin) & 1;
    cp_async_wait<0>();
    __syncthreads();  // tile m landed; every warp is done with tile m - 1 (buffer buf ^ 1, sdS, sP)
    if (m + 1 < m_end) load_query_tile(m + 1, buf ^ 1);
    cp_async_commit();

    const int m0 = m * kBlockM;
    const uint32_t sQ = s0 + Tr::kOffQ + buf * Tr::kQTileBytes;
    const uint32_t sdO = s0 + Tr::kOffdO + buf * Tr::kQTileBytes;
    const float* lse = sLse + buf * kBlockM;
    const float* dsum = sDsum + buf * kBlockM;

    // Columns need masking only on a partial last tile or across the causal diagonal.
    const bool col_mask = (m0 + kBlockM > Nq) || (causal && m0 + diag < n0 + kBlockN - 1);
#pragma unroll
    for (int ch = 0; ch < Tr::kSChunks; ++ch) {
      const int cb = sq * Tr::kSCols + ch * Tr::kSChunkCols;  // first query column of the chunk

      // S^T (this warp: 16 keys x kSChunkCols queries).
      float s[1][Tr::kSNT][4];
#pragma unroll
      for (int nt = 0; nt < Tr::kSNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
      }
      warp_gemm_ss<T, 1, Tr::kSNT, D / 16, false, false>(s, sK + kw * 16 * kPitchD * 2, kPitchD,
                                                          sQ + cb * kPitchD * 2, kPitchD, lane);

      // P^T in place.
#pragma unroll
      for (int nt = 0; nt < Tr::kSNT; ++nt) {
        const int c = cb + nt * 8 + 2 * t;  // column in the tile (queries c, c + 1)
        const float2 l = *reinterpret_cast<const float2*>(lse + c);
        const float nl0 = -l.x * kLog2e, nl1 = -l.y * kLog2e;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float p = fast_exp2(fmaf(s[0][nt][e], params.scale_log2, (e & 1) ? nl1 : nl0));
          if (!(e < 2 ? v0 : v1)) p = 0.f;
          if (col_mask) {
            const int i = m0 + c + (e & 1), j = e < 2 ? j0 : j1;
            if (i >= Nq || (causal && j > i + diag)) p = 0.f;
          }
          s[0][nt][e] = p;
        }
      }

      // dP^T (same shape as S^T).
      float dp[1][Tr::kSNT][4];
#pragma unroll
      for (int nt = 0; nt < Tr::kSNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[0][nt][e] = 0.f;
      }
      warp_gemm_ss<T, 1, Tr::kSNT, D / 16, false, false>(dp, sV + kw * 16 * kPitchD * 2, kPitchD,
                                                          sdO + cb * kPitchD * 2, kPitchD, lane);

      // dV += P^T dO straight from registers (dO rows cb.. of the chunk).
      if constexpr (Tr::kPInRegs) {
        warp_gemm_rs<T, Tr::kKVNT, Tr::kSChunkCols / 16, true>(dv, s[0], sdO + cb * kPitchD * 2, kPitchD,
                                                                lane);
      }

      // dS^T = P^T o (dP^T - softmax_d), in place of dP^T.
#pragma unroll
      for (int nt = 0; nt < Tr::kSNT; ++nt) {
        const int c = cb + nt * 8 + 2 * t;
        const float2 d = *reinterpret_cast<const float2*>(dsum + c);
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[0][nt][e] = s[0][nt][e] * (dp[0][nt][e] - ((e & 1) ? d.y : d.x));
      }
      store_frags_smem<T, 1, Tr::kSNT>(reinterpret_cast<T*>(smem + Tr::kOffdS), kPitchM, kw * 16, cb, dp,
                                       1.f, lane);

      if constexpr (Tr::kPInRegs) {
        // dK += dS^T Q straight from registers.
        warp_gemm_rs<T, Tr::kKVNT, Tr::kSChunkCols / 16, true>(dk, dp[0], sQ + cb * kPitchD * 2, kPitchD,
                                                                lane);
      } else {
        store_frags_smem<T, 1, Tr::kSNT>(reinterpret_cast<T*>(smem + Tr::kOffP), kPitchM, kw * 16, cb, s,
                                         1.f, lane);
      }
    }
    __syncthreads();  // dS^T (and P^T) complete

    if constexpr (!Tr::kPInRegs) {
      // dV += P^T dO, dK += dS^T Q with A from shared memory (this warp: kKVCols dims).
      warp_gemm_ss<T, 1, Tr::kKVNT, kBlockM / 16, false, true>(dv, sP + kw * 16 * kPitchM * 2, kPitchM,
                                                                sdO + sq * Tr::kKVCols * 2, kPitchD, lane);
      warp_gemm_ss<T, 1, Tr::kKVNT, kBlockM / 16, false, true>(dk, sdS + kw * 16 * kPitchM * 2, kPitchM,
                                                                sQ + sq * Tr::kKVCols * 2, kPitchD, lane);
    }

    // dQ (this warp: kQMT*16 queries x kQNT*8 dims) = dS K, A read transposed from dS^T.
    float dq[Tr::kQMT][Tr::kQNT][4];
#pragma unroll
    for (int mt = 0; mt < Tr::kQMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < Tr::kQNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[mt][nt][e] = 0.f;
      }
    }
    warp_gemm_ss<T, Tr::kQMT, Tr::kQNT, kBlockN / 16, true, true>(
        dq, sdS + qm * Tr::kQMT * 16 * 2, kPitchM, sK + qd * Tr::kQNT * 8 * 2, kPitchD, lane);
#pragma unroll
    for (int mt = 0; mt < Tr::kQMT; ++mt) {
      const int r = m0 + qm * Tr::kQMT * 16 + mt * 16 + g;
#pragma unroll
      for (int nt = 0; nt < Tr::kQNT; ++nt) {
        const int c = qd * Tr::kQNT * 8 + nt * 8 + 2 * t;
        if (r < Nq) atomic_add_f2(gdq + int64_t(r) * D + c, dq[mt][nt][0], dq[mt][nt][1]);
        if (r + 8 < Nq) atomic_add_f2(gdq + int64_t(r + 8) * D + c, dq[mt][nt][2], dq[mt][nt][3]);
      }
    }
  }

  // Epilogue: stage dK (times scale) and dV in sK / sV, then 16-byte stores of the valid rows.
  cp_async_wait<0>();
  __syncthreads();  // every warp is done reading sK / sV and no copy into them is in flight
  T* sKe = reinterpret_cast<T*>(smem + Tr::kOffK);
  T* sVe = reinterpret_cast<T*>(smem + Tr::kOffV);
  store_frags_smem<T, 1, Tr::kKVNT>(sVe, kPitchD, kw * 16, sq * Tr::kKVCols, dv, 1.f, lane);
  store_frags_smem<T, 1, Tr::kKVNT>(sKe, kPitchD, kw * 16, sq * Tr::kKVCols, dk, params.scale, lane);
  __syncthreads();
  T* gdk = static_cast<T*>(params.dk) + bh * Nk * D;
  T* gdv = static_cast<T*>(params.dv) + bh * Nk * D;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < kBlockN * kChunks / kNThreads; ++it) {
    const int idx = it * kNThreads + tid;
    const int r = idx / kChunks, c = idx % kChunks;
    if (n0 + r < Nk) {
      const int64_t o = int64_t(n0 + r) * D + c * 8;
      *reinterpret_cast<uint4*>(gdk + o) = *reinterpret_cast<const uint4*>(sKe + r * kPitchD + c * 8);
      *reinterpret_cast<uint4*>(gdv + o) = *reinterpret_cast<const uint4*>(sVe + r * kPitchD + c * 8);
    }
  }
}

template <typename T, int kHeadDim>
void run_bwd(const BwdParams& params, cudaStream_t stream) {
  using Tr = typename BwdConfig<kHeadDim>::Traits;
  const int64_t rows = int64_t(params.batch) * params.heads_q * params.len_q;
  if (rows == 0 || params.len_k == 0) return;

  // softmax_d = rowsum(dout * out).
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kThreadsPerRow = kChunks >= 32 ? 32 : kChunks >= 16 ? 16 : kChunks >= 8 ? 8 : 4;
  constexpr int kPreThreads = 256;
  constexpr int kRowsPerBlock = kPreThreads / kThreadsPerRow;
  bwd_dot_do_o_kernel<T, kHeadDim, kThreadsPerRow, kPreThreads>
      <<<unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock), kPreThreads, 0, stream>>>(params);

  // dK, dV and dq_accum.
  auto kernel = bwd_kernel<T, Tr>;
  constexpr int kSmem = Tr::kSmemBytes;
  if (kSmem > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }
  const dim3 grid((params.len_k + Tr::kBlockN - 1) / Tr::kBlockN, params.heads_q, params.batch);
  kernel<<<grid, Tr::kNThreads, kSmem, stream>>>(params);

  // dq = dq_accum * scale in the element type.
  const int64_t n4 = rows * kHeadDim / 4;
  bwd_convert_dq_kernel<T><<<unsigned((n4 + 255) / 256), 256, 0, stream>>>(params, n4);
}

}  // namespace flash
