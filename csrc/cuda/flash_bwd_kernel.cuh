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

// The work of one block of bwd_kernel.
template <typename T, typename Tr>
__device__ __forceinline__ void bwd_block(const BwdParams& params) {
  constexpr int D = Tr::kHeadDim;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kBlockN = Tr::kBlockN;
  constexpr int kPitchD = Tr::kPitchD;
  constexpr int kPitchM = Tr::kPitchM;
  constexpr int kNThreads = Tr::kNThreads;
  constexpr int MT = Tr::kKeyMT;
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
  // Step it of the query loop works on tile tile_at(it): in order, or rotated by the key block.
  const int n_tiles = m_end - m_begin;
  int rot = 0;
  if constexpr (Tr::kStagger) rot = n_tiles > 0 ? n_block % n_tiles : 0;
  auto tile_at = [&](int it) {
    if constexpr (Tr::kStagger) {
      const int m = m_begin + rot + it;
      return m >= m_end ? m - n_tiles : m;
    } else {
      return m_begin + it;
    }
  };

  // Warp roles: kw-th kWarpKeys keys; sq-th column slab of S^T and of dK / dV; (qm, qd) tile of dQ.
  const int kw = warp % Tr::kKeyWarps, sq = warp / Tr::kKeyWarps;
  const int qm = warp % Tr::kQWarpsM, qd = warp / Tr::kQWarpsM;
  const int key0 = kw * Tr::kWarpKeys;  // first key of this warp in the tile

  // This thread's key rows of S^T (accumulator rows g and g + 8 of each m16 tile) and their
  // visibility.
  int jrow[MT][2];
  bool vis[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    jrow[mt][0] = n0 + key0 + mt * 16 + g;
    jrow[mt][1] = jrow[mt][0] + 8;
    vis[mt][0] = jrow[mt][0] < L;
    vis[mt][1] = jrow[mt][1] < L;
  }
  if (params.key_padding_mask != nullptr) {
    const bool* kpm = params.key_padding_mask + b * params.key_padding_mask_batch_stride;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (vis[mt][0]) vis[mt][0] = !kpm[jrow[mt][0]];
      if (vis[mt][1]) vis[mt][1] = !kpm[jrow[mt][1]];
    }
  }

  const T* gq = static_cast<const T*>(params.q) + b * params.q_stride.batch + h * params.q_stride.head;
  const T* gk = static_cast<const T*>(params.k) + b * params.k_stride.batch + hk * params.k_stride.head;
  const T* gv = static_cast<const T*>(params.v) + b * params.v_stride.batch + hk * params.v_stride.head;
  const T* gdo =
      static_cast<const T*>(params.dout) + b * params.dout_stride.batch + h * params.dout_stride.head;
  const int64_t bh = int64_t(b) * Hq + h;
  const float* glse = params.lse_saved + bh * Nq;
  const float* gdsum = params.softmax_d + bh * Nq;
  float* gdq = params.dq_accum + bh * params.dq_accum_rows * D;

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

  // dQ of query tile m (this warp: kQMT*16 queries x kQNT*8 dims) = dS K, A read transposed from
  // dS^T buffer ds_buf, added to dq_accum.
  auto dq_tile = [&](int m, int ds_buf) {
    const int m0 = m * kBlockM;
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
        dq, sdS + ds_buf * Tr::kSTileBytes + qm * Tr::kQMT * 16 * 2, kPitchM, sK + qd * Tr::kQNT * 8 * 2,
        kPitchD, lane);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // On the H200: unguarded rows made d128v1 1-2 % faster and d64v3 1-4 % slower.
    constexpr bool kUnguarded = Tr::kDqMode == kDqRowsUnguarded;
#else
    constexpr bool kUnguarded = false;  // sm_80: two scalar atomics per pair; guarded uses fewer registers
#endif
    if constexpr (Tr::kDqMode == kDqFragments) {
      // dq_accum in fragment order: the 16 x 8 block (row block rb, column block cb) of a head is
      // 128 floats at (rb * D / 8 + cb) * 128, lane l's (c0, c1) at 2l and (c2, c3) at 64 + 2l. Rows
      // >= Nq exist (padded) and add zeros (their Q / dO rows were zero-filled and their P masked).
      float* gdq_frag = gdq + int64_t((m0 / 16 + qm * Tr::kQMT) * (D / 8) + qd * Tr::kQNT) * 128 + 2 * lane;
#pragma unroll
      for (int mt = 0; mt < Tr::kQMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Tr::kQNT; ++nt) {
          float* p = gdq_frag + (mt * (D / 8) + nt) * 128;
          atomic_add_f2(p, dq[mt][nt][0], dq[mt][nt][1]);
          atomic_add_f2(p + 64, dq[mt][nt][2], dq[mt][nt][3]);
        }
      }
    } else if constexpr (kUnguarded) {
      // Row-major without row guards (rows >= Nq exist and add zeros, as above); every atomic at a
      // constant offset from one base address (no branches between the atomics).
      float* gdq_r0 = gdq + int64_t(m0 + qm * Tr::kQMT * 16 + g) * D + qd * Tr::kQNT * 8 + 2 * t;
#pragma unroll
      for (int mt = 0; mt < Tr::kQMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Tr::kQNT; ++nt) {
          float* p = gdq_r0 + mt * 16 * D + nt * 8;
          atomic_add_f2(p, dq[mt][nt][0], dq[mt][nt][1]);
          atomic_add_f2(p + 8 * D, dq[mt][nt][2], dq[mt][nt][3]);
        }
      }
    } else {
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
  };

  load_rows_async<kBlockN, D, kPitchD, kNThreads>(sK, gk, params.k_stride.row, n0, Nk, tid);
  load_rows_async<kBlockN, D, kPitchD, kNThreads>(sV, gv, params.v_stride.row, n0, Nk, tid);
  if (m_begin < m_end) load_query_tile(Tr::kStagger ? tile_at(0) : m_begin, 0);
  cp_async_commit();

  float dk[MT][Tr::kKVNT][4], dv[MT][Tr::kKVNT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < Tr::kKVNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mt][nt][e] = dv[mt][nt][e] = 0.f;
    }
  }

  for (int step = m_begin; step < m_end; ++step) {
    const int m = Tr::kStagger ? tile_at(step - m_begin) : step;
    const int buf = (step - m_begin) & 1;
    cp_async_wait<0>();
    // Tile m landed; every warp is done with the previous step (buffer buf ^ 1, sdS, sP) and, with
    // kDeferDq, has stored the previous step's dS^T (buffer buf ^ 1 of sdS).
    __syncthreads();
    if (step + 1 < m_end) load_query_tile(Tr::kStagger ? tile_at(step + 1 - m_begin) : step + 1, buf ^ 1);
    cp_async_commit();
    if constexpr (Tr::kDeferDq) {
      if (step > m_begin) dq_tile(tile_at(step - 1 - m_begin), buf ^ 1);
    }

    const int m0 = m * kBlockM;
    const uint32_t sQ = s0 + Tr::kOffQ + buf * Tr::kQTileBytes;
    const uint32_t sdO = s0 + Tr::kOffdO + buf * Tr::kQTileBytes;
    const float* lse = sLse + buf * kBlockM;
    const float* dsum = sDsum + buf * kBlockM;
    const int ds_buf = Tr::kDeferDq ? buf : 0;
    T* sdS_tile = reinterpret_cast<T*>(smem + Tr::kOffdS + ds_buf * Tr::kSTileBytes);

    // Columns need masking only on a partial last tile or across the causal diagonal.
    const bool col_mask = (m0 + kBlockM > Nq) || (causal && m0 + diag < n0 + kBlockN - 1);
#pragma unroll
    for (int ch = 0; ch < Tr::kSChunks; ++ch) {
      const int cb = sq * Tr::kSCols + ch * Tr::kSChunkCols;  // first query column of the chunk

      // S^T (this warp: kWarpKeys keys x kSChunkCols queries).
      float s[MT][Tr::kSNT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Tr::kSNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
        }
      }
      warp_gemm_ss<T, MT, Tr::kSNT, D / 16, false, false>(s, sK + key0 * kPitchD * 2, kPitchD,
                                                           sQ + cb * kPitchD * 2, kPitchD, lane);

      // P^T in place.
#pragma unroll
      for (int nt = 0; nt < Tr::kSNT; ++nt) {
        const int c = cb + nt * 8 + 2 * t;  // column in the tile (queries c, c + 1)
        const float2 l = *reinterpret_cast<const float2*>(lse + c);
        const float nl0 = -l.x * kLog2e, nl1 = -l.y * kLog2e;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float p = fast_exp2(fmaf(s[mt][nt][e], params.scale_log2, (e & 1) ? nl1 : nl0));
            if (!(e < 2 ? vis[mt][0] : vis[mt][1])) p = 0.f;
            if (col_mask) {
              const int i = m0 + c + (e & 1), j = e < 2 ? jrow[mt][0] : jrow[mt][1];
              if (i >= Nq || (causal && j > i + diag)) p = 0.f;
            }
            s[mt][nt][e] = p;
          }
        }
      }

      // dP^T (same shape as S^T).
      float dp[MT][Tr::kSNT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < Tr::kSNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[mt][nt][e] = 0.f;
        }
      }
      warp_gemm_ss<T, MT, Tr::kSNT, D / 16, false, false>(dp, sV + key0 * kPitchD * 2, kPitchD,
                                                           sdO + cb * kPitchD * 2, kPitchD, lane);

      // dV += P^T dO straight from registers (dO rows cb.. of the chunk).
      if constexpr (Tr::kPInRegs) {
        warp_gemm_rs<T, MT, Tr::kKVNT, Tr::kSChunkCols / 16, true>(dv, s, sdO + cb * kPitchD * 2, kPitchD,
                                                                    lane);
      }

      // dS^T = P^T o (dP^T - softmax_d), in place of dP^T.
#pragma unroll
      for (int nt = 0; nt < Tr::kSNT; ++nt) {
        const int c = cb + nt * 8 + 2 * t;
        const float2 d = *reinterpret_cast<const float2*>(dsum + c);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            dp[mt][nt][e] = s[mt][nt][e] * (dp[mt][nt][e] - ((e & 1) ? d.y : d.x));
          }
        }
      }
      store_frags_smem<T, MT, Tr::kSNT>(sdS_tile, kPitchM, key0, cb, dp, 1.f, lane);

      if constexpr (Tr::kPInRegs) {
        // dK += dS^T Q straight from registers.
        warp_gemm_rs<T, MT, Tr::kKVNT, Tr::kSChunkCols / 16, true>(dk, dp, sQ + cb * kPitchD * 2, kPitchD,
                                                                    lane);
      } else {
        store_frags_smem<T, MT, Tr::kSNT>(reinterpret_cast<T*>(smem + Tr::kOffP), kPitchM, key0, cb, s, 1.f,
                                          lane);
      }
    }

    if constexpr (!Tr::kDeferDq) {
      __syncthreads();  // dS^T (and P^T) complete

      if constexpr (!Tr::kPInRegs) {
        // dV += P^T dO, dK += dS^T Q with A from shared memory (this warp: kKVCols dims).
        warp_gemm_ss<T, MT, Tr::kKVNT, kBlockM / 16, false, true>(dv, sP + key0 * kPitchM * 2, kPitchM,
                                                                   sdO + sq * Tr::kKVCols * 2, kPitchD, lane);
        warp_gemm_ss<T, MT, Tr::kKVNT, kBlockM / 16, false, true>(dk, sdS + key0 * kPitchM * 2, kPitchM,
                                                                   sQ + sq * Tr::kKVCols * 2, kPitchD, lane);
      }
      dq_tile(m, 0);
    }
  }
  if constexpr (Tr::kDeferDq) {
    if (n_tiles > 0) {
      __syncthreads();  // dS^T of the last step complete
      dq_tile(tile_at(n_tiles - 1), (n_tiles - 1) & 1);
    }
  }

  // Epilogue: stage dK (times scale) and dV in sK / sV, then 16-byte stores of the valid rows.
  cp_async_wait<0>();
  __syncthreads();  // every warp is done reading sK / sV and no copy into them is in flight
  T* sKe = reinterpret_cast<T*>(smem + Tr::kOffK);
  T* sVe = reinterpret_cast<T*>(smem + Tr::kOffV);
  store_frags_smem<T, MT, Tr::kKVNT>(sVe, kPitchD, key0, sq * Tr::kKVCols, dv, 1.f, lane);
  store_frags_smem<T, MT, Tr::kKVNT>(sKe, kPitchD, key0, sq * Tr::kKVCols, dk, params.scale, lane);
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

// Opt-in shared memory per block of sm_80 (sm_90: 227 KB).
constexpr int kMaxSmemPerBlockSm80 = 163 * 1024;

template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, Tr::kMinBlocks) bwd_kernel(const BwdParams params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (Tr::kSmemBytes > kMaxSmemPerBlockSm80) {
    __trap();  // a tile variant for sm_90's shared memory: its launch fails before reaching here
  } else
#endif
  {
    bwd_block<T, Tr>(params);
  }
}

// dK, dV and dq_accum with the tiles Tr, then dq from dq_accum (in Tr's dQ layout).
template <typename T, typename Tr>
void launch_bwd_kernel(const BwdParams& params, cudaStream_t stream) {
  auto kernel = bwd_kernel<T, Tr>;
  constexpr int kSmem = Tr::kSmemBytes;
  if (kSmem > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  }
  const dim3 grid((params.len_k + Tr::kBlockN - 1) / Tr::kBlockN, params.heads_q, params.batch);
  kernel<<<grid, Tr::kNThreads, kSmem, stream>>>(params);

  // dq = dq_accum * scale in the element type.
  const int64_t n4 = int64_t(params.batch) * params.heads_q * params.len_q * Tr::kHeadDim / 4;
  bwd_convert_dq_kernel<T, Tr::kDqMode == kDqFragments ? kDqMmaFragments : kDqRowMajor>
      <<<unsigned((n4 + 255) / 256), 256, 0, stream>>>(params, n4);
}

template <typename T, int kHeadDim>
void run_bwd(const BwdParams& params, cudaStream_t stream) {
  using Config = BwdConfig<kHeadDim>;
  const int64_t rows = int64_t(params.batch) * params.heads_q * params.len_q;
  if (rows == 0 || params.len_k == 0) return;

  // softmax_d = rowsum(dout * out).
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kThreadsPerRow = kChunks >= 32 ? 32 : kChunks >= 16 ? 16 : kChunks >= 8 ? 8 : 4;
  constexpr int kPreThreads = 256;
  constexpr int kRowsPerBlock = kPreThreads / kThreadsPerRow;
  bwd_dot_do_o_kernel<T, kHeadDim, kThreadsPerRow, kPreThreads>
      <<<unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock), kPreThreads, 0, stream>>>(params);
  if constexpr (kHeadDim == 64 || kHeadDim == 128) {
    if (params.use_sm90) {
      run_bwd_sm90<T, kHeadDim>(params, stream);
      return;
    }
  }

  // The default tiles where the device's blocks get enough shared memory, else the fallback (the
  // API layer has checked that one of them fits).
  if (Config::Traits::kSmemBytes <= params.max_smem_per_block) {
    launch_bwd_kernel<T, typename Config::Traits>(params, stream);
  } else {
    launch_bwd_kernel<T, typename Config::Fallback>(params, stream);
  }
}

}  // namespace flash
