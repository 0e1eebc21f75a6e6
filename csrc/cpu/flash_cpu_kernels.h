// Building blocks of the CPU flash attention kernels: SIMD vectors (GCC vector extensions), a vectorised
// exp2, a register-blocked GEMM micro-kernel and the load/store/pack helpers.
//
// No include guard: this file is included once per instruction set, inside the namespace
// flash::cpu::FLASH_CPU_ISA and a target pragma region, with these macros defined:
//   FLASH_CPU_VBYTES     vector width in bytes (64, 32 or 16)
//   FLASH_CPU_ISA_LEVEL  2: AVX-512 FMA intrinsics, 1: AVX2 FMA intrinsics, 0: plain multiply-add
// Everything it needs from outside (standard headers, immintrin.h) comes from flash_cpu_common.h.

typedef float vfloat __attribute__((vector_size(FLASH_CPU_VBYTES)));
typedef double vdouble __attribute__((vector_size(FLASH_CPU_VBYTES)));
typedef int32_t vint32 __attribute__((vector_size(FLASH_CPU_VBYTES)));
typedef int64_t vint64 __attribute__((vector_size(FLASH_CPU_VBYTES)));

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  using V = vfloat;
  using I = vint32;  // integer vector with the same lanes
  using IE = int32_t;
  static constexpr int L = FLASH_CPU_VBYTES / 4;
};
template <>
struct Simd<double> {
  using V = vdouble;
  using I = vint64;
  using IE = int64_t;
  static constexpr int L = FLASH_CPU_VBYTES / 8;
};

// Register blocking of the GEMM micro-kernel: kMR rows x kNV vectors of accumulators.
#if FLASH_CPU_ISA_LEVEL >= 2
constexpr int kMR = 6;
constexpr int kNV = 4;
#else
constexpr int kMR = 6;
constexpr int kNV = 2;
#endif

template <typename V>
FLASH_CPU_INLINE V vload(const void* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
FLASH_CPU_INLINE void vstore(void* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
// Broadcast. (A lane-by-lane loop would compile to one masked insert per lane.)
template <typename V, typename T>
FLASH_CPU_INLINE V vset1(T x);
template <>
FLASH_CPU_INLINE vfloat vset1<vfloat, float>(float x) {
#if FLASH_CPU_ISA_LEVEL >= 2
  return (vfloat)_mm512_set1_ps(x);
#elif FLASH_CPU_ISA_LEVEL == 1
  return (vfloat)_mm256_set1_ps(x);
#elif FLASH_CPU_X86
  return (vfloat)_mm_set1_ps(x);
#else
  return vfloat{} + x;
#endif
}
template <>
FLASH_CPU_INLINE vdouble vset1<vdouble, double>(double x) {
#if FLASH_CPU_ISA_LEVEL >= 2
  return (vdouble)_mm512_set1_pd(x);
#elif FLASH_CPU_ISA_LEVEL == 1
  return (vdouble)_mm256_set1_pd(x);
#elif FLASH_CPU_X86
  return (vdouble)_mm_set1_pd(x);
#else
  return vdouble{} + x;
#endif
}

FLASH_CPU_INLINE vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if FLASH_CPU_ISA_LEVEL >= 2
  return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif FLASH_CPU_ISA_LEVEL == 1
  return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
FLASH_CPU_INLINE vdouble vfma(vdouble a, vdouble b, vdouble c) {
#if FLASH_CPU_ISA_LEVEL >= 2
  return (vdouble)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif FLASH_CPU_ISA_LEVEL == 1
  return (vdouble)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

template <typename V>
FLASH_CPU_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

template <typename T, typename V>
FLASH_CPU_INLINE T hmax(V v) {
  T r = v[0];
#pragma GCC unroll 64
  for (int i = 1; i < Simd<T>::L; ++i) r = v[i] > r ? v[i] : r;
  return r;
}
template <typename T, typename V>
FLASH_CPU_INLINE T hsum(V v) {
  // Pairwise halving keeps the summation order fixed and short.
  T buf[Simd<T>::L];
  __builtin_memcpy(buf, &v, sizeof(V));
#pragma GCC unroll 8
  for (int w = Simd<T>::L / 2; w >= 1; w /= 2) {
#pragma GCC unroll 64
    for (int i = 0; i < w; ++i) buf[i] += buf[i + w];
  }
  return buf[0];
}

// 2^x for x <= 0 (larger x is not needed: every argument is a score minus an upper bound of the row).
// x < -126, including -inf, gives 0. Relative error about 1e-7.
FLASH_CPU_INLINE vfloat vexp2(vfloat x) {
  const vfloat lo = vset1<vfloat>(-127.0f);
  const vint32 tiny = x < vset1<vfloat>(-126.0f);
  x = vmax(x, lo);
  x = x < vset1<vfloat>(127.0f) ? x : vset1<vfloat>(127.0f);
  // Round to nearest by the 1.5 * 2^23 trick; n is read back from the low mantissa bits.
  const vfloat magic = vset1<vfloat>(12582912.0f);
  const vfloat t = x + magic;
  const vfloat r = t - magic;
  const vfloat f = x - r;  // in [-0.5, 0.5]
  const vint32 n = (vint32)t - (vint32)magic;
  vfloat p = vset1<vfloat>(1.5345810970757157e-04f);
  p = vfma(p, f, vset1<vfloat>(1.3399930903688073e-03f));
  p = vfma(p, f, vset1<vfloat>(9.618489071726799e-03f));
  p = vfma(p, f, vset1<vfloat>(5.550328642129898e-02f));
  p = vfma(p, f, vset1<vfloat>(2.4022646248340607e-01f));
  p = vfma(p, f, vset1<vfloat>(6.931471824645996e-01f));
  p = vfma(p, f, vset1<vfloat>(1.0f));
  const vfloat y = (vfloat)((vint32)p + (n << 23));
  return tiny ? vset1<vfloat>(0.0f) : y;
}
FLASH_CPU_INLINE vdouble vexp2(vdouble x) {
  vdouble y;
  for (int i = 0; i < Simd<double>::L; ++i) y[i] = std::exp2(x[i]);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// GEMM: C (M x N) = or += A (M x K) * B (K x N).
// A(m, k) = A[m * sam + k * sak] (so A may be read transposed), B row-major with leading dim ldb,
// C row-major with leading dim ldc. N is a multiple of the vector length; B and C have N columns.
// With ACC the product is summed in fresh registers and added to C at the end: long sums that are built
// from many calls (over key or query tiles) are then summed blockwise, which keeps float32 rounding
// errors close to those of a single dot product.

template <typename T, int MR, int NV, bool ACC>
static void gemm_micro(int64_t K, const T* __restrict A, int64_t sam, int64_t sak, const T* __restrict B,
                       int64_t ldb, T* __restrict C, int64_t ldc) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) acc[r][c] = V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = B + k * ldb;
    V b[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) b[c] = vload<V>(bk + c * L);
    const T* ak = A + k * sak;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V a = vset1<V>(ak[r * sam]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] = vfma(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      T* cp = C + r * ldc + c * L;
      vstore(cp, ACC ? vload<V>(cp) + acc[r][c] : acc[r][c]);
    }
  }
}

template <typename T, bool ACC>
using GemmMicroFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t);

template <typename T, bool ACC>
FLASH_CPU_INLINE GemmMicroFn<T, ACC> gemm_micro_fn(int mr, int nv) {
  // mr in 1..kMR, nv in 1..kNV.
  static constexpr GemmMicroFn<T, ACC> table[6][4] = {
      {&gemm_micro<T, 1, 1, ACC>, &gemm_micro<T, 1, 2, ACC>, &gemm_micro<T, 1, 3, ACC>,
       &gemm_micro<T, 1, 4, ACC>},
      {&gemm_micro<T, 2, 1, ACC>, &gemm_micro<T, 2, 2, ACC>, &gemm_micro<T, 2, 3, ACC>,
       &gemm_micro<T, 2, 4, ACC>},
      {&gemm_micro<T, 3, 1, ACC>, &gemm_micro<T, 3, 2, ACC>, &gemm_micro<T, 3, 3, ACC>,
       &gemm_micro<T, 3, 4, ACC>},
      {&gemm_micro<T, 4, 1, ACC>, &gemm_micro<T, 4, 2, ACC>, &gemm_micro<T, 4, 3, ACC>,
       &gemm_micro<T, 4, 4, ACC>},
      {&gemm_micro<T, 5, 1, ACC>, &gemm_micro<T, 5, 2, ACC>, &gemm_micro<T, 5, 3, ACC>,
       &gemm_micro<T, 5, 4, ACC>},
      {&gemm_micro<T, 6, 1, ACC>, &gemm_micro<T, 6, 2, ACC>, &gemm_micro<T, 6, 3, ACC>,
       &gemm_micro<T, 6, 4, ACC>},
  };
  return table[mr - 1][nv - 1];
}

template <typename T, bool ACC>
static void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                 int64_t ldb, T* C, int64_t ldc) {
  constexpr int L = Simd<T>::L;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!ACC) {
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    }
    return;
  }
  const int64_t nvec = N / L;
  for (int64_t c0 = 0; c0 < nvec; c0 += kNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, nvec - c0));
    const GemmMicroFn<T, ACC> full = gemm_micro_fn<T, ACC>(kMR, nv);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR) full(K, A + m0 * sam, sam, sak, B + c0 * L, ldb, C + m0 * ldc + c0 * L, ldc);
    if (m0 < M) {
      gemm_micro_fn<T, ACC>(static_cast<int>(M - m0), nv)(K, A + m0 * sam, sam, sak, B + c0 * L, ldb,
                                                         C + m0 * ldc + c0 * L, ldc);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Loads and stores with conversion. Storage types: float, double, uint16_t (bfloat16 bits).

template <typename S, typename T>
FLASH_CPU_INLINE T load_elem(const S* p) {
  return static_cast<T>(*p);
}
template <>
FLASH_CPU_INLINE float load_elem<uint16_t, float>(const uint16_t* p) {
  return bf16_to_float(*p);
}
template <typename S, typename T>
FLASH_CPU_INLINE void store_elem(S* p, T x) {
  *p = static_cast<S>(x);
}
template <>
FLASH_CPU_INLINE void store_elem<uint16_t, float>(uint16_t* p, float x) {
  *p = float_to_bf16(x);
}

// dst[0:n] = src[0:n] * mul, dst[n:np] = 0.
template <typename S, typename T>
FLASH_CPU_INLINE void load_row(const S* __restrict src, T* __restrict dst, int64_t n, int64_t np, T mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = load_elem<S, T>(src + d) * mul;
  for (int64_t d = n; d < np; ++d) dst[d] = T(0);
}
template <typename S, typename T>
FLASH_CPU_INLINE void load_row(const S* __restrict src, T* __restrict dst, int64_t n, int64_t np) {
  for (int64_t d = 0; d < n; ++d) dst[d] = load_elem<S, T>(src + d);
  for (int64_t d = n; d < np; ++d) dst[d] = T(0);
}
// dst[0:n] = src[0:n] * mul, converted to the storage type.
template <typename S, typename T>
FLASH_CPU_INLINE void store_row(const T* __restrict src, S* __restrict dst, int64_t n, T mul) {
  for (int64_t d = 0; d < n; ++d) store_elem<S, T>(dst + d, src[d] * mul);
}

// Packs rows [0, rows) of a (rows x D) block with row stride rs, transposed: dst[d * ld + j] = src[j][d];
// columns [rows, cols) of dst are zeroed.
template <typename S, typename T>
static void pack_transposed(const S* __restrict src, int64_t rs, int64_t rows, int64_t D, T* __restrict dst,
                            int64_t ld, int64_t cols) {
  constexpr int64_t kJ = 16;
  for (int64_t j0 = 0; j0 < rows; j0 += kJ) {
    const int64_t j1 = std::min(rows, j0 + kJ);
    for (int64_t d = 0; d < D; ++d) {
      T* out = dst + d * ld;
      for (int64_t j = j0; j < j1; ++j) out[j] = load_elem<S, T>(src + j * rs + d);
    }
  }
  if (cols > rows) {
    for (int64_t d = 0; d < D; ++d) std::fill(dst + d * ld + rows, dst + d * ld + cols, T(0));
  }
}

// Packs rows [0, rows) of a (rows x D) block with row stride rs into dst (ld columns, zero padded to Dp).
template <typename S, typename T>
static void pack_rows(const S* __restrict src, int64_t rs, int64_t rows, int64_t D, int64_t Dp,
                      T* __restrict dst, int64_t ld) {
  for (int64_t j = 0; j < rows; ++j) load_row<S, T>(src + j * rs, dst + j * ld, D, Dp);
}

// Key padding mask of keys [j0, j0 + n) of one batch as additive biases (0 or -inf) in bias[0:n].
// Returns the number of masked keys.
template <typename T>
static int64_t mask_bias(const bool* kpm, int64_t stride_k, int64_t j0, int64_t n, T* bias) {
  int64_t masked = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bool m = kpm[(j0 + j) * stride_k];
    masked += m ? 1 : 0;
    bias[j] = m ? -std::numeric_limits<T>::infinity() : T(0);
  }
  return masked;
}

// Number of keys of the tile [j0, j0 + bk) that query row i may see before the padding mask: keys below
// limit (the sequence's key length) and, with causal masking, keys j <= i + limit - Nq.
FLASH_CPU_INLINE int64_t visible_in_tile(int64_t i, int64_t j0, int64_t bk, int64_t limit, int64_t len_q,
                                         bool causal) {
  int64_t end = limit;
  if (causal) end = std::min(end, i + limit - len_q + 1);
  return std::min(std::max<int64_t>(end - j0, 0), bk);
}

// ---------------------------------------------------------------------------------------------------
// Softmax rows. Scores are in base-2 units (q was scaled by scale * log2(e)).

template <typename T>
FLASH_CPU_INLINE typename Simd<T>::V lane_index() {
  typename Simd<T>::V v;
  for (int i = 0; i < Simd<T>::L; ++i) v[i] = static_cast<T>(i);
  return v;
}

// One row of the forward's online softmax over a key tile. s holds the row's scores in columns
// [0, ncols_p) (ncols_p a multiple of the vector length); columns [n, ncols_p) are not visible, and
// bias (0 or -inf per column, or nullptr) adds the padding mask. Updates the running max m and sum l,
// overwrites s with the unnormalised probabilities (0 where not visible) and returns the factor by
// which the row's output accumulator must be rescaled.
template <typename T>
FLASH_CPU_INLINE T softmax_row_fwd(T* __restrict s, int64_t n, int64_t ncols_p, const T* __restrict bias,
                                   T& m, T& l) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t nfull = (n / L) * L;
  V vm = vset1<V>(kNegInf);
  if (bias != nullptr) {
    for (int64_t j = 0; j < nfull; j += L) {
      const V x = vload<V>(s + j) + vload<V>(bias + j);
      vstore(s + j, x);
      vm = vmax(vm, x);
    }
  } else {
    for (int64_t j = 0; j < nfull; j += L) vm = vmax(vm, vload<V>(s + j));
  }
  if (nfull < n) {
    V x = vload<V>(s + nfull);
    if (bias != nullptr) x += vload<V>(bias + nfull);
    x = lane_index<T>() < vset1<V>(static_cast<T>(n - nfull)) ? x : vset1<V>(kNegInf);
    vstore(s + nfull, x);
    vm = vmax(vm, x);
  }
  const T m_tile = hmax<T>(vm);
  const T m_new = m_tile > m ? m_tile : m;
  if (m_new == kNegInf) {
    std::fill(s, s + ncols_p, T(0));
    return T(1);
  }
  const T alpha = (m == m_new) ? T(1) : std::exp2(m - m_new);
  const int64_t nv_end = round_up(n, L);
  const V vmn = vset1<V>(m_new);
  V vsum = V{};
  for (int64_t j = 0; j < nv_end; j += L) {
    const V e = vexp2(vload<V>(s + j) - vmn);
    vstore(s + j, e);
    vsum += e;
  }
  for (int64_t j = nv_end; j < ncols_p; j += L) vstore(s + j, V{});
  l = l * alpha + hsum<T>(vsum);
  m = m_new;
  return alpha;
}

// One row of the backward: p = exp2(s + bias - lse2) on the visible columns [0, n), 0 elsewhere up to
// ncols_p; dp becomes ds = p * (dp - delta). In place.
template <typename T>
FLASH_CPU_INLINE void softmax_row_bwd(T* __restrict s, T* __restrict dp, int64_t n, int64_t ncols_p,
                                      const T* __restrict bias, T lse2, T delta) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  const V vl = vset1<V>(lse2);
  const V vd = vset1<V>(delta);
  const int64_t nfull = (n / L) * L;
  for (int64_t j = 0; j < nfull; j += L) {
    V x = vload<V>(s + j);
    if (bias != nullptr) x += vload<V>(bias + j);
    const V pv = vexp2(x - vl);
    vstore(s + j, pv);
    vstore(dp + j, pv * (vload<V>(dp + j) - vd));
  }
  if (nfull < n) {
    V x = vload<V>(s + nfull);
    if (bias != nullptr) x += vload<V>(bias + nfull);
    V pv = vexp2(x - vl);
    pv = lane_index<T>() < vset1<V>(static_cast<T>(n - nfull)) ? pv : V{};
    vstore(s + nfull, pv);
    vstore(dp + nfull, pv * (vload<V>(dp + nfull) - vd));
  }
  for (int64_t j = round_up(n, L); j < ncols_p; j += L) {
    vstore(s + j, V{});
    vstore(dp + j, V{});
  }
}
