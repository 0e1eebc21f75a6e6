// Forward kernel of the CPU flash attention, compiled once per instruction set.
//
// No include guard: included by flash_fwd_cpu.cpp inside a target pragma region, with FLASH_CPU_ISA (the
// namespace), FLASH_CPU_VBYTES and FLASH_CPU_ISA_LEVEL defined (see flash_cpu_kernels.h).
//
// One task is one query tile (kFwdBlockQ rows) of one (batch, query head). The tile of q is packed
// transposed (D x queries, scaled by scale * log2(e) so that exp2 gives the softmax), then the key tiles
// that any of its queries may see are visited in order: the transposed scores St = K Q^T (keys x queries)
// go into a tile-sized scratch, the online softmax works down the columns of St (vertical vector max and
// sum, one lane per query, no horizontal reductions) and rescales the output accumulator, and
// O += St^T V. K and V rows are read in place for float32/float64 (no packing); key tiles past the causal
// diagonal or the sequence's key length, and tiles whose keys are all padding, are skipped.

namespace flash {
namespace cpu {
namespace FLASH_CPU_ISA {

#include "flash_cpu_kernels.h"

// Online softmax over one key tile of the transposed scores St (rows: keys, lanes: queries; ldst columns,
// nvq vectors). Row jj is key j0 + jj; key_masked[jj] marks padding keys. When partial, lane i sees key
// j only if j < qend[i]. Updates the running max m and sum l (per query, as vectors), overwrites St with
// the probabilities and writes the rescale factors of the output rows into alpha.
template <typename T, bool kPartial>
static void softmax_tile_fwd(T* __restrict st, int64_t ldst, int64_t nvq, int64_t rows, int64_t j0,
                             const bool* __restrict key_masked, const typename Simd<T>::I* __restrict qend,
                             T* __restrict m, T* __restrict l, T* __restrict alpha) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  using E = typename Simd<T>::IE;
  constexpr int L = Simd<T>::L;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < nvq; ++c) {
    // One vector of queries at a time: the column of St is walked twice (max, then exp and sum).
    T* col = st + c * L;
    const I qe = kPartial ? qend[c] : I{};
    V vm = vset1<V>(kNegInf);
    for (int64_t jj = 0; jj < rows; ++jj) {
      if (key_masked != nullptr && key_masked[jj]) continue;
      V x = vload<V>(col + jj * ldst);
      if (kPartial) {
        const I j = I{} + static_cast<E>(j0 + jj);
        x = j < qe ? x : vset1<V>(kNegInf);
      }
      vm = vmax(vm, x);
    }
    const V m_old = vload<V>(m + c * L);
    const V m_new = vmax(m_old, vm);
    // Queries that have seen no key yet keep max -inf: subtract 0 instead so that exp2 gives 0, not NaN.
    const V m_sub = m_new == vset1<V>(kNegInf) ? V{} : m_new;
    const V a = vexp2(m_old - m_sub);
    V sum = V{};
    for (int64_t jj = 0; jj < rows; ++jj) {
      T* x_ptr = col + jj * ldst;
      if (key_masked != nullptr && key_masked[jj]) {
        vstore(x_ptr, V{});
        continue;
      }
      V p = vexp2(vload<V>(x_ptr) - m_sub);
      if (kPartial) {
        const I j = I{} + static_cast<E>(j0 + jj);
        p = j < qe ? p : V{};
      }
      vstore(x_ptr, p);
      sum += p;
    }
    vstore(m + c * L, m_new);
    vstore(l + c * L, vload<V>(l + c * L) * a + sum);
    vstore(alpha + c * L, a);
  }
}

template <typename S, typename T>
static void fwd_impl(const FwdParams& p, int64_t task_begin, int64_t task_end) {
  using I = typename Simd<T>::I;
  using E = typename Simd<T>::IE;
  constexpr int L = Simd<T>::L;
  constexpr int64_t BQ = kFwdBlockQ;
  constexpr int64_t BK = kFwdBlockK;
  static_assert(BQ % 16 == 0, "query tile must be a multiple of every vector length");
  constexpr int64_t NVQ = BQ / L;
  const int64_t D = p.head_dim;
  const int64_t Dp = round_up(D, L);
  const int64_t Nq = p.len_q, Hq = p.heads_q;
  const int64_t nqt = ceil_div(Nq, BQ);
  const T qmul = static_cast<T>(p.scale * 1.4426950408889634073599);  // scale * log2(e)
  const T ln2 = static_cast<T>(0.6931471805599453094172);
  // K and V are read in place when they need no conversion (and V no padding).
  constexpr bool kSameType = std::is_same<S, T>::value;
  const bool direct_v = kSameType && Dp == D;

  Scratch<T> qt_buf(D * BQ), o_buf(BQ * Dp), k_buf(kSameType ? 1 : BK * D), v_buf(direct_v ? 1 : BK * Dp),
      st_buf(BK * BQ), m_buf(BQ), l_buf(BQ), alpha_buf(BQ);
  Scratch<I> qend_buf(NVQ);
  Scratch<bool> masked_buf(BK);
  T* Qt = qt_buf.get();
  T* O = o_buf.get();
  T* Kc = k_buf.get();
  T* Vc = v_buf.get();
  T* St = st_buf.get();
  T* m = m_buf.get();
  T* l = l_buf.get();
  T* alpha = alpha_buf.get();
  I* qend = qend_buf.get();
  bool* key_masked = masked_buf.get();
  E* qend_e = reinterpret_cast<E*>(qend);

  const S* q_all = static_cast<const S*>(p.q);
  const S* k_all = static_cast<const S*>(p.k);
  const S* v_all = static_cast<const S*>(p.v);
  S* out_all = static_cast<S*>(p.out);

  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t qt = zigzag(task % nqt, nqt);
    const int64_t bh = task / nqt;
    const int64_t h = bh % Hq;
    const int64_t b = bh / Hq;
    const int64_t hk = h / p.group;
    const int64_t i0 = qt * BQ;
    const int64_t M = std::min(BQ, Nq - i0);
    const int64_t limit = p.key_limit(b);
    // Query i sees keys j < qend_i (before the padding mask).
    int64_t qend_min = limit, qend_max = 0;
    for (int64_t r = 0; r < BQ; ++r) {
      int64_t e = 0;
      if (r < M) {
        e = p.is_causal ? std::max<int64_t>(0, std::min(limit, i0 + r + limit - Nq + 1)) : limit;
        qend_min = std::min(qend_min, e);
        qend_max = std::max(qend_max, e);
      }
      qend_e[r] = static_cast<E>(e);
    }
    const int64_t kv_end = qend_max;

    const S* qb = q_all + b * p.q_stride.batch + h * p.q_stride.head + i0 * p.q_stride.row;
    const S* kb = k_all + b * p.k_stride.batch + hk * p.k_stride.head;
    const S* vb = v_all + b * p.v_stride.batch + hk * p.v_stride.head;
    const bool* kpm_b = p.kpm != nullptr ? p.kpm + b * p.kpm_stride_b : nullptr;

    std::fill(m, m + BQ, -std::numeric_limits<T>::infinity());
    std::fill(l, l + BQ, T(0));
    if (kv_end > 0) {
      // Q^T (D x BQ), scaled; query columns past the tile are zero.
      pack_transposed<S, T>(qb, p.q_stride.row, M, D, Qt, BQ, BQ);
      for (int64_t i = 0; i < D * BQ; ++i) Qt[i] *= qmul;
      std::fill(O, O + M * Dp, T(0));
    }

    for (int64_t j0 = 0; j0 < kv_end; j0 += BK) {
      const int64_t rows = std::min(BK, kv_end - j0);  // keys of the tile some query may see
      const bool* masked = nullptr;
      if (kpm_b != nullptr) {
        int64_t count = 0;
        for (int64_t jj = 0; jj < rows; ++jj) {
          key_masked[jj] = kpm_b[(j0 + jj) * p.kpm_stride_k];
          count += key_masked[jj] ? 1 : 0;
        }
        if (count == rows) continue;
        if (count > 0) masked = key_masked;
      }

      const T* Kr;
      int64_t ldk;
      if (kSameType) {
        Kr = reinterpret_cast<const T*>(kb + j0 * p.k_stride.row);
        ldk = p.k_stride.row;
      } else {
        pack_rows<S, T>(kb + j0 * p.k_stride.row, p.k_stride.row, rows, D, D, Kc, D);
        Kr = Kc;
        ldk = D;
      }
      const T* Vr;
      int64_t ldv;
      if (direct_v) {
        Vr = reinterpret_cast<const T*>(vb + j0 * p.v_stride.row);
        ldv = p.v_stride.row;
      } else {
        pack_rows<S, T>(vb + j0 * p.v_stride.row, p.v_stride.row, rows, D, Dp, Vc, Dp);
        Vr = Vc;
        ldv = Dp;
      }

      // St = K Q^T: keys x queries.
      gemm<T, false>(rows, BQ, D, Kr, ldk, 1, Qt, BQ, St, BQ);
      if (j0 + rows <= qend_min) {
        softmax_tile_fwd<T, false>(St, BQ, NVQ, rows, j0, masked, qend, m, l, alpha);
      } else {
        softmax_tile_fwd<T, true>(St, BQ, NVQ, rows, j0, masked, qend, m, l, alpha);
      }
      for (int64_t r = 0; r < M; ++r) {
        if (alpha[r] != T(1)) {
          T* o = O + r * Dp;
          const T a = alpha[r];
          for (int64_t d = 0; d < Dp; ++d) o[d] *= a;
        }
      }
      // O += P V with P = St^T.
      gemm<T, true>(M, Dp, rows, St, 1, BQ, Vr, ldv, O, Dp);
    }

    S* ob = out_all + ((b * Hq + h) * Nq + i0) * D;
    float* lb = p.lse + (b * Hq + h) * Nq + i0;
    for (int64_t r = 0; r < M; ++r) {
      if (l[r] > T(0)) {
        store_row<S, T>(O + r * Dp, ob + r * D, D, T(1) / l[r]);
        lb[r] = static_cast<float>((m[r] + std::log2(l[r])) * ln2);
      } else {
        std::fill(ob + r * D, ob + (r + 1) * D, S(0));
        lb[r] = std::numeric_limits<float>::infinity();
      }
    }
  }
}

static void fwd_tasks(const FwdParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32: fwd_impl<float, float>(p, begin, end); break;
    case DType::kFloat64: fwd_impl<double, double>(p, begin, end); break;
    case DType::kBFloat16: fwd_impl<uint16_t, float>(p, begin, end); break;
  }
}

}  // namespace FLASH_CPU_ISA
}  // namespace cpu
}  // namespace flash
