// CUDA implementation of flash_attn::fwd: input checks, output allocation, FwdParams, dispatch on
// (dtype, head dim) to run_fwd (cuda/instantiations/flash_fwd_*.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "../flash_checks.h"
#include "flash_launch.h"
#include "flash_params.h"

namespace flash {
namespace {

constexpr const char* kOp = "flash_attn.fwd";
constexpr int64_t kMaxGridYZ = 65535;

// FLASH_ATTN_POISON=1: outputs start as NaN, so a test can prove the kernel writes every element.
bool poison_outputs() {
  const char* env = std::getenv("FLASH_ATTN_POISON");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// The kernel copies 16-byte chunks: the base pointer and every stride it multiplies by a possibly
// non-zero index (batch, head, row) must be multiples of 8 elements (16 bytes).
bool is_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// A fresh contiguous copy when t's layout does not suit the kernel's 16-byte copies.
at::Tensor aligned_view_or_copy(const at::Tensor& t) {
  if (is_16b_aligned(t)) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

Strides4 strides_of(const at::Tensor& t) { return Strides4{t.stride(0), t.stride(1), t.stride(2)}; }

template <typename Element>
void dispatch_head_dim(const FwdParams& params, cudaStream_t stream) {
  switch (params.head_dim) {
    case 32: run_fwd<Element, 32>(params, stream); break;
    case 64: run_fwd<Element, 64>(params, stream); break;
    case 96: run_fwd<Element, 96>(params, stream); break;
    case 128: run_fwd<Element, 128>(params, stream); break;
    case 256: run_fwd<Element, 256>(params, stream); break;
    default: FLASH_CHECK_VALUE(false, kOp, ": no kernel for head dim ", params.head_dim);
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                            const at::Tensor& v_in,
                                            const std::optional<at::Tensor>& key_padding_mask,
                                            const std::optional<at::Tensor>& seqlens_k, double scale,
                                            bool is_causal) {
  const AttnShape s = check_attention_inputs(kOp, q_in, k_in, v_in, key_padding_mask, seqlens_k);
  FLASH_CHECK_VALUE(q_in.is_cuda(), kOp, ": expected q on a CUDA device, got ", q_in.device());
  const auto dtype = q_in.scalar_type();
  FLASH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16, kOp,
                   ": expected q to be float16 or bfloat16 on CUDA, got ", dtype);
  const int64_t D = s.head_dim;
  FLASH_CHECK_VALUE(D == 32 || D == 64 || D == 96 || D == 128 || D == 256, kOp,
                    ": expected head dim D in {32, 64, 96, 128, 256} on CUDA, got ", D);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  FLASH_CHECK_VALUE(s.batch <= kIntMax && s.heads_q <= kIntMax && s.len_q <= kIntMax && s.len_k <= kIntMax,
                    kOp, ": expected B, Hq, Nq and Nk to fit in int32, got q ", q_in.sizes(), ", k ",
                    k_in.sizes());
  FLASH_CHECK_VALUE(s.batch <= kMaxGridYZ && s.heads_q <= kMaxGridYZ, kOp,
                    ": expected B and Hq to be at most 65535 on CUDA, got B = ", s.batch,
                    ", Hq = ", s.heads_q);

  c10::cuda::CUDAGuard device_guard(q_in.device());

  at::Tensor out = at::empty({s.batch, s.heads_q, s.len_q, D}, q_in.options());
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.len_q}, q_in.options().dtype(at::kFloat));
  if (s.batch == 0 || s.heads_q == 0 || s.len_q == 0) return {out, lse};
  if (s.len_k == 0) {
    // Every row is fully masked.
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const at::Tensor q = aligned_view_or_copy(q_in);
  const at::Tensor k = aligned_view_or_copy(k_in);
  const at::Tensor v = aligned_view_or_copy(v_in);
  std::optional<at::Tensor> kpm;
  if (key_padding_mask.has_value()) kpm = *key_padding_mask;
  std::optional<at::Tensor> lens;
  if (seqlens_k.has_value()) lens = seqlens_k->contiguous();

  if (poison_outputs()) {
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
  }

  FwdParams params;
  std::memset(&params, 0, sizeof(params));
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.q_stride = strides_of(q);
  params.k_stride = strides_of(k);
  params.v_stride = strides_of(v);
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.key_padding_mask = kpm.has_value() ? kpm->data_ptr<bool>() : nullptr;
  params.key_padding_mask_batch_stride = kpm.has_value() ? kpm->stride(0) : 0;
  params.seqlens_k = lens.has_value() ? lens->data_ptr<int32_t>() : nullptr;
  params.batch = static_cast<int>(s.batch);
  params.heads_q = static_cast<int>(s.heads_q);
  params.heads_kv = static_cast<int>(s.heads_kv);
  params.len_q = static_cast<int>(s.len_q);
  params.len_k = static_cast<int>(s.len_k);
  params.head_dim = static_cast<int>(D);
  params.group = static_cast<int>(s.heads_q / s.heads_kv);
  params.scale = static_cast<float>(scale);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634074);  // scale * log2(e)
  params.is_causal = is_causal;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (dtype == at::kBFloat16) {
    dispatch_head_dim<__nv_bfloat16>(params, stream);
  } else {
    dispatch_head_dim<__half>(params, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace flash

TORCH_LIBRARY_IMPL(flash_attn, CUDA, m) { m.impl("fwd", &flash::fwd_cuda); }
