// Backward kernels of the CPU flash attention, compiled once per instruction set.
//
// No include guard: included by flash_bwd_cpu.cpp inside a target pragma region, with FLASH_CPU_ISA (the
// namespace), FLASH_CPU_VBYTES and FLASH_CPU_ISA_LEVEL defined (see flash_cpu_kernels.h).
//
// For a pair (query tile, key tile) the probabilities are recomputed from the saved log-sum-exp,
// P = exp(S - lse), then dP = dO V^T and dS = P * (dP - delta) with delta = rowsum(dO * O); the pair adds
// P^T dO to dV, dS^T Q to dK and dS K to dQ (the scale is applied when storing). Three task kinds:
//  - grouped: one task owns a (batch, kv head): it visits its key tiles, and for each the query tiles of
//    every query head of the group, so dK/dV rows and the group's dQ rows have a single writer;
//  - dkdv: one task per (batch, kv head, key tile), dK and dV only;
//  - dq: one task per (batch, query head, query tile), dQ only.
// For float64 inputs the log-sum-exp is first recomputed in float64 (lse_exact tasks), so that the
// gradients are as accurate as the inputs. The dispatcher uses grouped when there are enough
// (batch, kv head) tasks to keep every thread busy, and dkdv followed by dq otherwise (which recomputes S
// and dP once more).

namespace flash {
namespace cpu {
namespace FLASH_CPU_ISA {

#include "flash_cpu_kernels.h"

template <typename T>
struct BwdWork {
  int64_t D, Dp;
  T qmul;  // scale * log2(e)
  // Query tile: q (scaled by qmul) and dout rows, zero padded to Dp; lse in base 2; delta.
  T* Qs;
  T* dOs;
  T* lse2;
  T* delta;
  // Key tile: k and v transposed (D x kBwdBlockK), k rows (kBwdBlockK x Dp) unless read in place.
  T* Kt;
  T* Vt;
  T* Kr;
  const T* Krow;
  int64_t ldk;
  // Pair scratch: P and dS (kBwdBlockQ x kBwdBlockK), padding-mask biases, visible keys per row.
  T* P;
  T* dS;
  T* bias;
  int64_t* nvis;
  // Accumulators: dK, dV of a key tile (kBwdBlockK x Dp), dQ of a query tile (kBwdBlockQ x Dp).
  T* dKa;
  T* dVa;
  T* dQa;
};

template <typename S, typename T>
class BwdKernel {
 public:
  static constexpr int L = Simd<T>::L;
  static constexpr int64_t BQ = kBwdBlockQ;
  static constexpr int64_t BK = kBwdBlockK;
  static_assert(BK % 16 == 0, "key tile must be a multiple of every vector length");

  explicit BwdKernel(const BwdParams& p)
      : p_(p),
        D_(p.head_dim),
        Dp_(round_up(p.head_dim, L)),
        direct_k_(std::is_same<S, T>::value && Dp_ == D_),
        qs_(BQ * Dp_),
        dos_(BQ * Dp_),
        lse2_(BQ),
        delta_(BQ),
        kt_(D_ * BK),
        vt_(D_ * BK),
        kr_(direct_k_ ? 1 : BK * Dp_),
        pb_(BQ * BK),
        dsb_(BQ * BK),
        bias_(BK),
        nvis_(BQ),
        dka_(BK * Dp_),
        dva_(BK * Dp_),
        dqa_(BQ * Dp_) {
    w_.D = D_;
    w_.Dp = Dp_;
    w_.qmul = static_cast<T>(p.scale * 1.4426950408889634073599);
    w_.Qs = qs_.get();
    w_.dOs = dos_.get();
    w_.lse2 = lse2_.get();
    w_.delta = delta_.get();
    w_.Kt = kt_.get();
    w_.Vt = vt_.get();
    w_.Kr = kr_.get();
    w_.Krow = nullptr;
    w_.ldk = Dp_;
    w_.P = pb_.get();
    w_.dS = dsb_.get();
    w_.bias = bias_.get();
    w_.nvis = nvis_.get();
    w_.dKa = dka_.get();
    w_.dVa = dva_.get();
    w_.dQa = dqa_.get();
  }

  // Task (b, hk): dK, dV of the kv head and dQ of its query heads.
  void grouped(int64_t b, int64_t hk) {
    const int64_t Nq = p_.len_q;
    T* dq_acc = static_cast<T*>(p_.dq_acc);
    T* dq_first = dq_acc + (b * p_.heads_q + hk * p_.group) * Nq * D_;
    const int64_t dq_count = p_.group * Nq * D_;
    std::fill(dq_first, dq_first + dq_count, T(0));
    for (int64_t j0 = 0; j0 < p_.len_k; j0 += BK) key_tile(b, hk, j0, /*with_dq=*/true);
    const T scale = static_cast<T>(p_.scale);
    for (int64_t i = 0; i < dq_count; ++i) dq_first[i] *= scale;
  }

  // Task (b, hk, key tile): dK, dV only.
  void dkdv(int64_t b, int64_t hk, int64_t kt) { key_tile(b, hk, kt * BK, /*with_dq=*/false); }

  // Task (b, h, query tile): the rows' log-sum-exp, recomputed in the compute type (base 2).
  void lse_exact(int64_t b, int64_t h, int64_t qt) {
    const int64_t Nq = p_.len_q;
    const int64_t i0 = qt * BQ;
    const int64_t M = std::min(BQ, Nq - i0);
    const int64_t hk = h / p_.group;
    const int64_t limit = p_.key_limit(b);
    const int64_t kv_end = p_.is_causal ? std::min(limit, (i0 + M - 1) + limit - Nq + 1) : limit;
    T* m = w_.lse2;  // running max and sum share the pair scratch: lse2 and delta are reloaded later
    T* l = w_.delta;
    for (int64_t r = 0; r < M; ++r) {
      m[r] = -std::numeric_limits<T>::infinity();
      l[r] = T(0);
    }
    const S* qb = static_cast<const S*>(p_.q) + b * p_.q_stride.batch + h * p_.q_stride.head +
                  i0 * p_.q_stride.row;
    if (kv_end > 0) {
      for (int64_t r = 0; r < M; ++r) load_row<S, T>(qb + r * p_.q_stride.row, w_.Qs + r * Dp_, D_, Dp_, w_.qmul);
    }
    for (int64_t j0 = 0; j0 < kv_end; j0 += BK) {
      const int64_t bk = std::min(BK, p_.len_k - j0);
      const int64_t nk_vis = std::min(bk, kv_end - j0);
      bool use_bias = false;
      if (!tile_bias(b, j0, nk_vis, use_bias)) continue;
      const int64_t nmax = row_visibility(i0, M, j0, bk, limit);
      if (nmax <= 0) continue;
      load_key_tile(b, hk, j0, nmax, /*keys_only=*/true);
      const int64_t ncols_p = round_up(nmax, L);
      gemm<T, false>(M, ncols_p, D_, w_.Qs, Dp_, 1, w_.Kt, BK, w_.P, BK);
      for (int64_t r = 0; r < M; ++r) {
        softmax_row_fwd<T>(w_.P + r * BK, w_.nvis[r], ncols_p, use_bias ? w_.bias : nullptr, m[r], l[r]);
      }
    }
    T* out = static_cast<T*>(p_.lse2_exact) + (b * p_.heads_q + h) * Nq + i0;
    for (int64_t r = 0; r < M; ++r) {
      out[r] = l[r] > T(0) ? m[r] + std::log2(l[r]) : std::numeric_limits<T>::infinity();
    }
  }

  // Task (b, h, query tile): dQ only.
  void dq(int64_t b, int64_t h, int64_t qt) {
    const int64_t Nq = p_.len_q;
    const int64_t i0 = qt * BQ;
    const int64_t M = std::min(BQ, Nq - i0);
    const int64_t hk = h / p_.group;
    const int64_t limit = p_.key_limit(b);
    const int64_t kv_end = p_.is_causal ? std::min(limit, (i0 + M - 1) + limit - Nq + 1) : limit;
    std::fill(w_.dQa, w_.dQa + M * Dp_, T(0));
    if (kv_end > 0) load_query_tile(b, h, i0, M);
    for (int64_t j0 = 0; j0 < kv_end; j0 += BK) {
      const int64_t bk = std::min(BK, p_.len_k - j0);
      const int64_t nk_vis = std::min(bk, kv_end - j0);
      bool use_bias = false;
      if (!tile_bias(b, j0, nk_vis, use_bias)) continue;
      const int64_t nmax = row_visibility(i0, M, j0, bk, limit);
      if (nmax <= 0) continue;
      load_key_tile(b, hk, j0, nmax);
      pair(M, nmax, use_bias);
      gemm<T, true>(M, Dp_, nmax, w_.dS, BK, 1, w_.Krow, w_.ldk, w_.dQa, Dp_);
    }
    T* dq_rows = static_cast<T*>(p_.dq_acc) + ((b * p_.heads_q + h) * Nq + i0) * D_;
    const T scale = static_cast<T>(p_.scale);
    for (int64_t r = 0; r < M; ++r) {
      for (int64_t d = 0; d < D_; ++d) dq_rows[r * D_ + d] = w_.dQa[r * Dp_ + d] * scale;
    }
  }

 private:
  // Keys [j0, j0 + n) against the padding mask: fills the bias, returns false if every key is masked.
  bool tile_bias(int64_t b, int64_t j0, int64_t n, bool& use_bias) {
    use_bias = false;
    if (p_.kpm == nullptr) return true;
    const int64_t masked = mask_bias<T>(p_.kpm + b * p_.kpm_stride_b, p_.kpm_stride_k, j0, n, w_.bias);
    if (masked == n) return false;
    use_bias = masked > 0;
    std::fill(w_.bias + n, w_.bias + round_up(n, L), T(0));
    return true;
  }

  // Visible keys of the tile per query row (before the padding mask); returns their maximum.
  int64_t row_visibility(int64_t i0, int64_t M, int64_t j0, int64_t bk, int64_t limit) {
    int64_t nmax = 0;
    for (int64_t r = 0; r < M; ++r) {
      w_.nvis[r] = visible_in_tile(i0 + r, j0, bk, limit, p_.len_q, p_.is_causal);
      nmax = std::max(nmax, w_.nvis[r]);
    }
    return nmax;
  }

  void load_query_tile(int64_t b, int64_t h, int64_t i0, int64_t M) {
    const S* qb = static_cast<const S*>(p_.q) + b * p_.q_stride.batch + h * p_.q_stride.head +
                  i0 * p_.q_stride.row;
    const S* gb = static_cast<const S*>(p_.dout) + b * p_.dout_stride.batch + h * p_.dout_stride.head +
                  i0 * p_.dout_stride.row;
    for (int64_t r = 0; r < M; ++r) {
      load_row<S, T>(qb + r * p_.q_stride.row, w_.Qs + r * Dp_, D_, Dp_, w_.qmul);
      load_row<S, T>(gb + r * p_.dout_stride.row, w_.dOs + r * Dp_, D_, Dp_);
    }
    const int64_t row0 = (b * p_.heads_q + h) * p_.len_q + i0;
    const T* delta = static_cast<const T*>(p_.delta) + row0;
    if (p_.lse2_exact != nullptr) {
      const T* lse2 = static_cast<const T*>(p_.lse2_exact) + row0;
      for (int64_t r = 0; r < M; ++r) w_.lse2[r] = lse2[r];
    } else {
      const float* lse = p_.lse + row0;
      const T log2e = static_cast<T>(1.4426950408889634073599);
      for (int64_t r = 0; r < M; ++r) w_.lse2[r] = static_cast<T>(lse[r]) * log2e;
    }
    for (int64_t r = 0; r < M; ++r) w_.delta[r] = delta[r];
  }

  // Packs keys/values [j0, j0 + n); only K^T when keys_only.
  void load_key_tile(int64_t b, int64_t hk, int64_t j0, int64_t n, bool keys_only = false) {
    const S* kb = static_cast<const S*>(p_.k) + b * p_.k_stride.batch + hk * p_.k_stride.head +
                  j0 * p_.k_stride.row;
    const S* vb = static_cast<const S*>(p_.v) + b * p_.v_stride.batch + hk * p_.v_stride.head +
                  j0 * p_.v_stride.row;
    const int64_t cols = round_up(n, L);
    pack_transposed<S, T>(kb, p_.k_stride.row, n, D_, w_.Kt, BK, cols);
    if (keys_only) return;
    pack_transposed<S, T>(vb, p_.v_stride.row, n, D_, w_.Vt, BK, cols);
    if (direct_k_) {
      w_.Krow = reinterpret_cast<const T*>(kb);
      w_.ldk = p_.k_stride.row;
    } else {
      pack_rows<S, T>(kb, p_.k_stride.row, n, D_, Dp_, w_.Kr, Dp_);
      w_.Krow = w_.Kr;
      w_.ldk = Dp_;
    }
  }

  // P and dS of the loaded query tile (M rows) against the loaded key tile (nmax keys).
  void pair(int64_t M, int64_t nmax, bool use_bias) {
    const int64_t ncols_p = round_up(nmax, L);
    gemm<T, false>(M, ncols_p, D_, w_.Qs, Dp_, 1, w_.Kt, BK, w_.P, BK);
    gemm<T, false>(M, ncols_p, D_, w_.dOs, Dp_, 1, w_.Vt, BK, w_.dS, BK);
    const T* bias = use_bias ? w_.bias : nullptr;
    for (int64_t r = 0; r < M; ++r) {
      softmax_row_bwd<T>(w_.P + r * BK, w_.dS + r * BK, w_.nvis[r], ncols_p, bias, w_.lse2[r], w_.delta[r]);
    }
  }

  // Key tile [j0, j0 + BK) of (b, hk): dK and dV over all query rows of the group; with_dq also adds the
  // pairs' dS K to dq_acc.
  void key_tile(int64_t b, int64_t hk, int64_t j0, bool with_dq) {
    const int64_t Nq = p_.len_q;
    const int64_t bk = std::min(BK, p_.len_k - j0);
    const int64_t limit = p_.key_limit(b);
    const int64_t nk_vis = std::min(bk, limit - j0);
    std::fill(w_.dKa, w_.dKa + bk * Dp_, T(0));
    std::fill(w_.dVa, w_.dVa + bk * Dp_, T(0));
    bool use_bias = false;
    if (nk_vis > 0 && Nq > 0 && tile_bias(b, j0, nk_vis, use_bias)) {
      load_key_tile(b, hk, j0, nk_vis);
      // First query row that sees key j0 under the causal mask: i + limit - Nq >= j0.
      const int64_t first_row = p_.is_causal ? std::max<int64_t>(0, j0 - limit + Nq) : 0;
      T* dq_acc = static_cast<T*>(p_.dq_acc);
      for (int64_t g = 0; g < p_.group; ++g) {
        const int64_t h = hk * p_.group + g;
        for (int64_t i0 = (first_row / BQ) * BQ; i0 < Nq; i0 += BQ) {
          const int64_t M = std::min(BQ, Nq - i0);
          const int64_t nmax = row_visibility(i0, M, j0, nk_vis, limit);
          if (nmax <= 0) continue;
          load_query_tile(b, h, i0, M);
          pair(M, nmax, use_bias);
          gemm<T, true>(nmax, Dp_, M, w_.P, 1, BK, w_.dOs, Dp_, w_.dVa, Dp_);
          gemm<T, true>(nmax, Dp_, M, w_.dS, 1, BK, w_.Qs, Dp_, w_.dKa, Dp_);
          if (with_dq) {
            T* dq_rows = dq_acc + ((b * p_.heads_q + h) * Nq + i0) * D_;
            if (Dp_ == D_) {
              gemm<T, true>(M, Dp_, nmax, w_.dS, BK, 1, w_.Krow, w_.ldk, dq_rows, D_);
            } else {
              gemm<T, false>(M, Dp_, nmax, w_.dS, BK, 1, w_.Krow, w_.ldk, w_.dQa, Dp_);
              for (int64_t r = 0; r < M; ++r) {
                for (int64_t d = 0; d < D_; ++d) dq_rows[r * D_ + d] += w_.dQa[r * Dp_ + d];
              }
            }
          }
        }
      }
    }
    // dK = dS^T (Q * scale) and Qs carries scale * log2(e), hence the factor ln(2).
    const int64_t row0 = (b * p_.heads_kv + hk) * p_.len_k + j0;
    S* dk = static_cast<S*>(p_.dk) + row0 * D_;
    S* dv = static_cast<S*>(p_.dv) + row0 * D_;
    const T ln2 = static_cast<T>(0.6931471805599453094172);
    for (int64_t j = 0; j < bk; ++j) {
      store_row<S, T>(w_.dKa + j * Dp_, dk + j * D_, D_, ln2);
      store_row<S, T>(w_.dVa + j * Dp_, dv + j * D_, D_, T(1));
    }
  }

  const BwdParams& p_;
  const int64_t D_, Dp_;
  const bool direct_k_;
  Scratch<T> qs_, dos_, lse2_, delta_, kt_, vt_, kr_, pb_, dsb_, bias_;
  Scratch<int64_t> nvis_;
  Scratch<T> dka_, dva_, dqa_;
  BwdWork<T> w_;
};

// delta = rowsum(dout * out) for tasks (b, hq).
template <typename S, typename T>
static void bwd_delta_impl(const BwdParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim, Nq = p.len_q;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % p.heads_q;
    const int64_t b = task / p.heads_q;
    const S* g = static_cast<const S*>(p.dout) + b * p.dout_stride.batch + h * p.dout_stride.head;
    const S* o = static_cast<const S*>(p.out) + b * p.out_stride.batch + h * p.out_stride.head;
    T* delta = static_cast<T*>(p.delta) + task * Nq;
    for (int64_t i = 0; i < Nq; ++i) {
      const S* gi = g + i * p.dout_stride.row;
      const S* oi = o + i * p.out_stride.row;
      T acc = T(0);
      for (int64_t d = 0; d < D; ++d) acc += load_elem<S, T>(gi + d) * load_elem<S, T>(oi + d);
      delta[i] = acc;
    }
  }
}

template <typename S, typename T>
static void bwd_grouped_impl(const BwdParams& p, int64_t begin, int64_t end) {
  BwdKernel<S, T> k(p);
  for (int64_t task = begin; task < end; ++task) k.grouped(task / p.heads_kv, task % p.heads_kv);
}

template <typename S, typename T>
static void bwd_dkdv_impl(const BwdParams& p, int64_t begin, int64_t end) {
  BwdKernel<S, T> k(p);
  const int64_t nkt = ceil_div(p.len_k, kBwdBlockK);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t kt = zigzag(task % nkt, nkt);
    const int64_t bh = task / nkt;
    k.dkdv(bh / p.heads_kv, bh % p.heads_kv, kt);
  }
}

template <typename S, typename T>
static void bwd_lse_exact_impl(const BwdParams& p, int64_t begin, int64_t end) {
  BwdKernel<S, T> k(p);
  const int64_t nqt = ceil_div(p.len_q, kBwdBlockQ);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t qt = zigzag(task % nqt, nqt);
    const int64_t bh = task / nqt;
    k.lse_exact(bh / p.heads_q, bh % p.heads_q, qt);
  }
}

template <typename S, typename T>
static void bwd_dq_impl(const BwdParams& p, int64_t begin, int64_t end) {
  BwdKernel<S, T> k(p);
  const int64_t nqt = ceil_div(p.len_q, kBwdBlockQ);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t qt = zigzag(task % nqt, nqt);
    const int64_t bh = task / nqt;
    k.dq(bh / p.heads_q, bh % p.heads_q, qt);
  }
}

#define FLASH_CPU_BWD_DISPATCH(name)                                                   \
  static void name(const BwdParams& p, int64_t begin, int64_t end) {                  \
    switch (p.dtype) {                                                                 \
      case DType::kFloat32: name##_impl<float, float>(p, begin, end); break;           \
      case DType::kFloat64: name##_impl<double, double>(p, begin, end); break;         \
      case DType::kBFloat16: name##_impl<uint16_t, float>(p, begin, end); break;       \
    }                                                                                  \
  }
FLASH_CPU_BWD_DISPATCH(bwd_delta)
FLASH_CPU_BWD_DISPATCH(bwd_grouped)
FLASH_CPU_BWD_DISPATCH(bwd_lse_exact)
FLASH_CPU_BWD_DISPATCH(bwd_dkdv)
FLASH_CPU_BWD_DISPATCH(bwd_dq)
#undef FLASH_CPU_BWD_DISPATCH

static BwdKernels bwd_kernels() { return BwdKernels{&bwd_delta, &bwd_lse_exact, &bwd_grouped, &bwd_dkdv, &bwd_dq}; }

}  // namespace FLASH_CPU_ISA
}  // namespace cpu
}  // namespace flash
