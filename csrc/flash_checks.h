// Input checks shared by the CPU and CUDA implementations of the flash_attn ops.
// Every message names the op, the argument and what was expected; TORCH_CHECK_VALUE raises
// ValueError and TORCH_CHECK_TYPE raises TypeError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>

namespace flash {

// FLASH_ATTN_POISON=1: outputs (and scratch) start as NaN, so a test can prove that the kernels write
// every element they return or read. Every op of the extension reads it per call.
inline bool poison_outputs() {
  const char* env = std::getenv("FLASH_ATTN_POISON");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// Fill the tensors with NaN when poisoning is on.
inline void poison(std::initializer_list<at::Tensor*> tensors) {
  if (!poison_outputs()) return;
  for (at::Tensor* t : tensors) t->fill_(std::numeric_limits<float>::quiet_NaN());
}

// Error messages are assembled here as one std::string and handed to TORCH_CHECK_* as a single C string.
// That keeps integer formatting out of std::ostream inside the extension: on some toolchains the
// extension and libtorch see different libstdc++ builds, and the ostream integer path then crashes.
inline void append(std::string& out, const char* part) { out += part; }
inline void append(std::string& out, const std::string& part) { out += part; }
inline void append(std::string& out, char part) { out += part; }
inline void append(std::string& out, bool part) { out += part ? "true" : "false"; }
inline void append(std::string& out, int part) { out += std::to_string(part); }
inline void append(std::string& out, long part) { out += std::to_string(part); }
inline void append(std::string& out, long long part) { out += std::to_string(part); }
inline void append(std::string& out, double part) { out += std::to_string(part); }
inline void append(std::string& out, at::ScalarType part) { out += c10::toString(part); }
inline void append(std::string& out, const c10::Device& part) { out += part.str(); }
inline void append(std::string& out, at::IntArrayRef part) {
  out += '[';
  for (size_t i = 0; i < part.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(part[i]);
  }
  out += ']';
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

}  // namespace flash

#define FLASH_CHECK_VALUE(cond, ...)                                      \
  do {                                                                    \
    if (C10_UNLIKELY(!(cond))) {                                          \
      TORCH_CHECK_VALUE(false, ::flash::message(__VA_ARGS__).c_str());    \
    }                                                                     \
  } while (0)

#define FLASH_CHECK_TYPE(cond, ...)                                       \
  do {                                                                    \
    if (C10_UNLIKELY(!(cond))) {                                          \
      TORCH_CHECK_TYPE(false, ::flash::message(__VA_ARGS__).c_str());     \
    }                                                                     \
  } while (0)

namespace flash {

struct AttnShape {
  int64_t batch;     // B
  int64_t heads_q;   // Hq
  int64_t heads_kv;  // Hkv
  int64_t len_q;     // Nq
  int64_t len_k;     // Nk
  int64_t head_dim;  // D
};

inline void check_rank4(const char* op, const char* name, const at::Tensor& t, const char* dims) {
  FLASH_CHECK_VALUE(t.dim() == 4, op, ": expected ", name, " to have 4 dims ", dims, ", got ", t.dim(),
                    " (shape ", t.sizes(), ")");
  FLASH_CHECK_VALUE(t.size(3) == 0 || t.stride(3) == 1, op, ": expected ", name,
                    " to have a contiguous last dim (stride 1), got strides ", t.strides(),
                    "; call .contiguous() first");
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  FLASH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": expected ", name, " to have q's dtype ",
                   q.scalar_type(), ", got ", t.scalar_type());
  FLASH_CHECK_VALUE(t.device() == q.device(), op, ": expected ", name, " on q's device ", q.device(),
                    ", got ", t.device());
}

inline AttnShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        const std::optional<at::Tensor>& seqlens_k) {
  check_rank4(op, "q", q, "(B, Hq, Nq, D)");
  check_rank4(op, "k", k, "(B, Hkv, Nk, D)");
  check_rank4(op, "v", v, "(B, Hkv, Nk, D)");
  check_same(op, "k", k, q);
  check_same(op, "v", v, q);
  AttnShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  FLASH_CHECK_VALUE(k.size(0) == s.batch && v.size(0) == s.batch, op,
                    ": expected q, k and v to share the batch size B, got q ", q.sizes(), ", k ",
                    k.sizes(), ", v ", v.sizes());
  FLASH_CHECK_VALUE(k.size(3) == s.head_dim && v.size(3) == s.head_dim, op,
                    ": expected q, k and v to share the head dim D, got q ", q.sizes(), ", k ",
                    k.sizes(), ", v ", v.sizes());
  FLASH_CHECK_VALUE(v.size(1) == s.heads_kv && v.size(2) == s.len_k, op,
                    ": expected v to have k's shape (B, Hkv, Nk, D) = ", k.sizes(), ", got ", v.sizes());
  FLASH_CHECK_VALUE(s.heads_kv > 0 || s.heads_q == 0, op, ": expected k to have at least one head, got ",
                    k.sizes());
  FLASH_CHECK_VALUE(s.heads_kv == 0 || s.heads_q % s.heads_kv == 0, op,
                    ": expected the query heads Hq to be a multiple of the key/value heads Hkv, got Hq = ",
                    s.heads_q, ", Hkv = ", s.heads_kv);
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    FLASH_CHECK_TYPE(m.scalar_type() == at::kBool, op,
                     ": expected key_padding_mask to be a bool tensor (True = ignore the key), got ",
                     m.scalar_type());
    FLASH_CHECK_VALUE(m.dim() == 2 && m.size(0) == s.batch && m.size(1) == s.len_k, op,
                      ": expected key_padding_mask of shape (B, Nk) = (", s.batch, ", ", s.len_k, "), got ",
                      m.sizes());
    FLASH_CHECK_VALUE(m.device() == q.device(), op, ": expected key_padding_mask on q's device ",
                      q.device(), ", got ", m.device());
    FLASH_CHECK_VALUE(m.size(1) <= 1 || m.stride(1) == 1, op,
                      ": expected key_padding_mask to have a contiguous last dim, got strides ", m.strides());
  }
  if (seqlens_k.has_value()) {
    const at::Tensor& l = *seqlens_k;
    FLASH_CHECK_TYPE(l.scalar_type() == at::kInt, op, ": expected seqlens_k to be int32, got ",
                     l.scalar_type());
    FLASH_CHECK_VALUE(l.dim() == 1 && l.size(0) == s.batch, op, ": expected seqlens_k of shape (B,) = (",
                      s.batch, ",), got ", l.sizes());
    FLASH_CHECK_VALUE(l.device() == q.device(), op, ": expected seqlens_k on q's device ", q.device(),
                      ", got ", l.device());
  }
  return s;
}

// The backward's extra tensors: dout and out like q, lse (B, Hq, Nq) float32.
inline AttnShape check_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                       const at::Tensor& lse,
                                       const std::optional<at::Tensor>& key_padding_mask,
                                       const std::optional<at::Tensor>& seqlens_k) {
  AttnShape s = check_attention_inputs(op, q, k, v, key_padding_mask, seqlens_k);
  check_rank4(op, "dout", dout, "(B, Hq, Nq, D)");
  check_rank4(op, "out", out, "(B, Hq, Nq, D)");
  check_same(op, "dout", dout, q);
  check_same(op, "out", out, q);
  FLASH_CHECK_VALUE(dout.sizes() == q.sizes(), op, ": expected dout of q's shape ", q.sizes(), ", got ",
                    dout.sizes());
  FLASH_CHECK_VALUE(out.sizes() == q.sizes(), op, ": expected out of q's shape ", q.sizes(), ", got ",
                    out.sizes());
  FLASH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": expected lse to be float32, got ",
                   lse.scalar_type());
  FLASH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads_q &&
                        lse.size(2) == s.len_q,
                    op, ": expected lse of shape (B, Hq, Nq) = (", s.batch, ", ", s.heads_q, ", ", s.len_q,
                    "), got ", lse.sizes());
  FLASH_CHECK_VALUE(lse.device() == q.device(), op, ": expected lse on q's device ", q.device(), ", got ",
                    lse.device());
  return s;
}

}  // namespace flash
