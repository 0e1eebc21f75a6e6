// Shared pieces of the CPU flash attention: plain parameter structs read by the kernels, tile sizes, the
// instruction-set choice at run time, scratch buffers, and the helpers that turn the op's tensors into
// parameters. The kernel bodies (flash_*_cpu_kernel.h) are compiled once per instruction set and see only
// the plain parts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include <ATen/core/Tensor.h>

#include "../flash_checks.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FLASH_CPU_X86 1
#else
#define FLASH_CPU_X86 0
#endif

// Multi-versioned kernels use GCC's target pragmas; other compilers build the portable kernels only
// (still vectorised by GCC-style vector extensions where the compiler supports them).
#if FLASH_CPU_X86 && defined(__GNUC__) && !defined(__clang__)
#define FLASH_CPU_MULTI_ISA 1
#else
#define FLASH_CPU_MULTI_ISA 0
#endif

#if defined(__GNUC__)
#define FLASH_CPU_INLINE inline __attribute__((always_inline))
#else
#define FLASH_CPU_INLINE inline
#endif

namespace flash {
namespace cpu {

// Tile sizes (rows of a query tile, columns of a key tile). Shared by every instruction set so that the
// task counts the dispatch code computes match the kernels.
constexpr int64_t kFwdBlockQ = 64;
constexpr int64_t kFwdBlockK = 256;
constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBwdBlockK = 128;

enum class DType { kFloat32, kFloat64, kBFloat16 };

// Element strides of a (B, H, N, D) tensor whose last dim has stride 1.
struct Strides {
  int64_t batch;
  int64_t head;
  int64_t row;
};

struct AttnParams {
  DType dtype;
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim;
  int64_t group;  // heads_q / heads_kv
  double scale;
  bool is_causal;

  const void* q;
  const void* k;
  const void* v;
  Strides q_stride, k_stride, v_stride;

  // key_padding_mask (B, Nk), True = ignore; element strides. nullptr when absent.
  const bool* kpm;
  int64_t kpm_stride_b, kpm_stride_k;
  // seqlens_k (B,) int32, element stride. nullptr when absent.
  const int32_t* seqlens;
  int64_t seqlens_stride;

  // Number of visible keys of batch b before masking by key_padding_mask: seqlens_k[b] clamped into
  // [0, Nk], else Nk.
  int64_t key_limit(int64_t b) const {
    if (seqlens == nullptr) return len_k;
    const int64_t l = seqlens[b * seqlens_stride];
    return std::min<int64_t>(std::max<int64_t>(l, 0), len_k);
  }
};

struct FwdParams : AttnParams {
  void* out;   // (B, Hq, Nq, D) contiguous, input dtype
  float* lse;  // (B, Hq, Nq) contiguous
};

struct BwdParams : AttnParams {
  const void* dout;
  const void* out;
  Strides dout_stride, out_stride;
  const float* lse;  // (B, Hq, Nq) contiguous
  // rowsum(dout * out) per query row, (B, Hq, Nq) contiguous, in the compute type (float or double).
  void* delta;
  // float64 only: the log-sum-exp recomputed in float64, in base 2 (log2 of the row's sum of
  // 2^(scores * log2(e))), (B, Hq, Nq); the float32 lse would limit the gradients to float32 accuracy.
  // nullptr otherwise.
  void* lse2_exact;
  // dq accumulator (B, Hq, Nq, D) contiguous in the compute type; it is the dq output itself for float32
  // and float64 inputs.
  void* dq_acc;
  // dk, dv (B, Hkv, Nk, D) contiguous, input dtype.
  void* dk;
  void* dv;
};

// Instruction sets with their own build of the kernels.
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU supports, capped by FLASH_ATTN_CPU_ISA=avx512|avx2|generic when
// set (for tests and measurements).
inline Isa select_isa() {
  Isa best = Isa::kGeneric;
#if FLASH_CPU_MULTI_ISA
  static const Isa supported = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  best = supported;
#endif
  const char* env = std::getenv("FLASH_ATTN_CPU_ISA");
  if (env != nullptr) {
    Isa cap = best;
    if (std::strcmp(env, "generic") == 0) cap = Isa::kGeneric;
    else if (std::strcmp(env, "avx2") == 0) cap = Isa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) cap = Isa::kAvx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

// Kernel entry points; each runs a contiguous range of tasks.
// Forward: tasks (b, hq, query tile of kFwdBlockQ rows).
using FwdFn = void (*)(const FwdParams&, int64_t begin, int64_t end);
// Backward: delta tasks (b, hq); grouped tasks (b, hkv) computing dk, dv and the group's dq in one pass;
// split passes: dkdv tasks (b, hkv, key tile of kBwdBlockK rows), dq tasks (b, hq, query tile).
using BwdFn = void (*)(const BwdParams&, int64_t begin, int64_t end);
struct BwdKernels {
  BwdFn delta;
  BwdFn lse_exact;  // tasks (b, hq, query tile), fills lse2_exact (float64 only)
  BwdFn grouped;
  BwdFn dkdv;
  BwdFn dq;
};

// 64-byte aligned scratch of n elements, freed on scope exit.
template <typename T>
class Scratch {
 public:
  explicit Scratch(size_t n) {
    const size_t bytes = ((std::max<size_t>(n, 1) * sizeof(T) + 63) / 64) * 64;
    ptr_ = static_cast<T*>(::operator new(bytes, std::align_val_t(64)));
  }
  ~Scratch() { ::operator delete(ptr_, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Tile order 0, n-1, 1, n-2, ...: with causal masking the cost of a tile grows with (or shrinks with) its
// index, and at::parallel_for hands each thread a contiguous range of tasks; interleaving both ends keeps
// the ranges balanced even for a single (batch, head).
inline int64_t zigzag(int64_t i, int64_t n) { return (i % 2 == 0) ? i / 2 : n - 1 - i / 2; }

// bfloat16 <-> float by bit manipulation (round to nearest even; NaN stays NaN).
FLASH_CPU_INLINE float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
FLASH_CPU_INLINE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// ---------------------------------------------------------------------------------------------------
// Dispatch-side helpers (torch tensors to plain parameters).

// Dtype and head-dim checks of the CPU kernels (raise before any work starts).
inline DType check_cpu_dtype_and_head_dim(const char* op, const at::Tensor& q, int64_t head_dim) {
  DType dtype;
  switch (q.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kDouble: dtype = DType::kFloat64; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    default:
      FLASH_CHECK_TYPE(false, op, ": expected q to be float32, float64 or bfloat16 on CPU, got ",
                       q.scalar_type());
  }
  FLASH_CHECK_VALUE(head_dim >= 1 && head_dim <= 256, op,
                    ": expected the head dim D to be in 1..256 on CPU, got D = ", head_dim);
  return dtype;
}

// Fills the fields shared by the forward and backward parameters.
inline void fill_attn_params(AttnParams& p, DType dtype, const AttnShape& s, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
                      const std::optional<at::Tensor>& seqlens_k, double scale, bool is_causal) {
  p.dtype = dtype;
  p.batch = s.batch;
  p.heads_q = s.heads_q;
  p.heads_kv = s.heads_kv;
  p.len_q = s.len_q;
  p.len_k = s.len_k;
  p.head_dim = s.head_dim;
  p.group = s.heads_kv > 0 ? s.heads_q / s.heads_kv : 1;
  p.scale = scale;
  p.is_causal = is_causal;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = {q.stride(0), q.stride(1), q.stride(2)};
  p.k_stride = {k.stride(0), k.stride(1), k.stride(2)};
  p.v_stride = {v.stride(0), v.stride(1), v.stride(2)};
  p.kpm = nullptr;
  p.kpm_stride_b = 0;
  p.kpm_stride_k = 1;
  if (key_padding_mask.has_value()) {
    p.kpm = key_padding_mask->data_ptr<bool>();
    p.kpm_stride_b = key_padding_mask->stride(0);
    p.kpm_stride_k = key_padding_mask->stride(1);
  }
  p.seqlens = nullptr;
  p.seqlens_stride = 1;
  if (seqlens_k.has_value()) {
    p.seqlens = seqlens_k->data_ptr<int32_t>();
    p.seqlens_stride = seqlens_k->stride(0);
  }
}

}  // namespace cpu
}  // namespace flash
