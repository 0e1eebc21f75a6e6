// CUDA implementation of flash_attn::bwd: input checks, allocation of the gradients and scratch,
// BwdParams, dispatch over (dtype, head dim), and the GQA group reduction of dK / dV.
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
#include "flash_bwd_traits.h"
#include "flash_device_checks.h"
#include "flash_launch.h"
#include "flash_params.h"

namespace {

constexpr const char* kOp = "flash_attn.bwd";

// The kernels copy rows in 16-byte pieces: the data pointer and every stride of a dim with more
// than one entry must be 16-byte aligned (8 elements). Otherwise work on a fresh contiguous copy.
at::Tensor aligned_rows(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

flash::Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The least shared memory per block a backward launch for this head dim needs (flash_bwd_traits.h).
int bwd_min_smem_bytes(int64_t head_dim) {
  switch (head_dim) {
    case 32: return flash::BwdConfig<32>::kMinSmemBytes;
    case 64: return flash::BwdConfig<64>::kMinSmemBytes;
    case 96: return flash::BwdConfig<96>::kMinSmemBytes;
    case 128: return flash::BwdConfig<128>::kMinSmemBytes;
    default: return flash::BwdConfig<256>::kMinSmemBytes;
  }
}

// The Hopper backward (flash_bwd_sm90_kernel.cuh) on sm_90 devices of a build with sm_90a code, for head dims 64
// and 128 (fwd+bwd 1.19-1.34x the mma.sync backward at D = 128, docs/perf.md v17; 1.09-1.28x at D = 64, v18)
// unless FLASH_ATTN_BWD_WGMMA=0 (the mma.sync backward everywhere).
bool use_sm90_backward(const c10::Device& device, int64_t head_dim) {
  const bool on = flash::env_flag(kOp, "FLASH_ATTN_BWD_WGMMA").value_or(true);
#ifdef FLASH_WITH_SM90A
  return on && (head_dim == 64 || head_dim == 128) && flash::compute_capability_major(device) == 9;
#else
  (void)on;
  (void)device;
  (void)head_dim;
  return false;
#endif
}

template <typename Element>
void run_bwd_hdim(const flash::BwdParams& params, int64_t head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 32: flash::run_bwd<Element, 32>(params, stream); break;
    case 64: flash::run_bwd<Element, 64>(params, stream); break;
    case 96: flash::run_bwd<Element, 96>(params, stream); break;
    case 128: flash::run_bwd<Element, 128>(params, stream); break;
    case 256: flash::run_bwd<Element, 256>(params, stream); break;
    default: FLASH_CHECK_VALUE(false, kOp, ": unsupported head dim ", head_dim);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& seqlens_k, double scale, bool is_causal) {
  const flash::AttnShape s =
      flash::check_backward_inputs(kOp, dout_in, q_in, k_in, v_in, out_in, lse_in, key_padding_mask, seqlens_k);
  FLASH_CHECK_VALUE(q_in.is_cuda(), kOp, ": expected q on a CUDA device, got ", q_in.device());
  const at::ScalarType dtype = q_in.scalar_type();
  FLASH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16, kOp,
                   ": expected q, k, v, dout and out to be float16 or bfloat16 on CUDA, got ", dtype);
  FLASH_CHECK_VALUE(s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 96 || s.head_dim == 128 ||
                        s.head_dim == 256,
                    kOp, ": expected head dim D in {32, 64, 96, 128, 256} on CUDA, got ", s.head_dim);
  FLASH_CHECK_VALUE(s.batch <= 65535 && s.heads_q <= 65535, kOp,
                    ": expected at most 65535 batches and query heads on CUDA, got B = ", s.batch,
                    ", Hq = ", s.heads_q);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  FLASH_CHECK_VALUE(s.len_q <= kIntMax && s.len_k <= kIntMax, kOp,
                    ": expected sequence lengths below 2^31, got Nq = ", s.len_q, ", Nk = ", s.len_k);
  if (key_padding_mask.has_value()) {
    FLASH_CHECK_VALUE(key_padding_mask->is_cuda(), kOp, ": expected key_padding_mask on a CUDA device");
  }
  if (seqlens_k.has_value()) {
    FLASH_CHECK_VALUE(seqlens_k->is_cuda(), kOp, ": expected seqlens_k on a CUDA device");
  }

  c10::cuda::CUDAGuard device_guard(q_in.device());
  const bool sm90 = use_sm90_backward(q_in.device(), s.head_dim);
  const int max_smem = flash::max_smem_per_block(q_in.device());
  flash::check_smem_fits(kOp, s.head_dim, bwd_min_smem_bytes(s.head_dim), q_in.device(), max_smem);
  const auto opts = q_in.options();
  const int64_t B = s.batch, Hq = s.heads_q, Hkv = s.heads_kv, Nq = s.len_q, Nk = s.len_k, D = s.head_dim;

  // Empty problems: nothing to launch.
  if (B == 0 || Hq == 0 || Nq == 0 || Nk == 0) {
    return {at::zeros({B, Hq, Nq, D}, opts), at::zeros({B, Hkv, Nk, D}, opts),
            at::zeros({B, Hkv, Nk, D}, opts)};
  }

  const at::Tensor dout = aligned_rows(dout_in), q = aligned_rows(q_in), k = aligned_rows(k_in),
                   v = aligned_rows(v_in), out = aligned_rows(out_in);
  const at::Tensor lse = lse_in.contiguous();
  std::optional<at::Tensor> lens;
  if (seqlens_k.has_value()) lens = seqlens_k->contiguous();

  // dK / dV per query head; summed over each group of query heads below when Hq > Hkv.
  at::Tensor dq = at::empty({B, Hq, Nq, D}, opts);
  at::Tensor dk_heads = at::empty({B, Hq, Nk, D}, opts);
  at::Tensor dv_heads = at::empty({B, Hq, Nk, D}, opts);
  const int64_t dq_accum_rows =
      (Nq + flash::kDqAccumRowMultiple - 1) / flash::kDqAccumRowMultiple * flash::kDqAccumRowMultiple;
  at::Tensor dq_accum = at::zeros({B, Hq, dq_accum_rows, D}, opts.dtype(at::kFloat));
  at::Tensor softmax_d = at::empty({B, Hq, Nq}, opts.dtype(at::kFloat));
  if (flash::poison_outputs()) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    dq.fill_(nan);
    dk_heads.fill_(nan);
    dv_heads.fill_(nan);
  }

  flash::BwdParams p;
  std::memset(&p, 0, sizeof(p));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride = strides_of(q);
  p.k_stride = strides_of(k);
  p.v_stride = strides_of(v);
  p.out = nullptr;
  p.lse = nullptr;
  if (key_padding_mask.has_value()) {
    p.key_padding_mask = key_padding_mask->data_ptr<bool>();
    p.key_padding_mask_batch_stride = key_padding_mask->stride(0);
  }
  if (lens.has_value()) p.seqlens_k = lens->data_ptr<int32_t>();
  p.batch = static_cast<int>(B);
  p.heads_q = static_cast<int>(Hq);
  p.heads_kv = static_cast<int>(Hkv);
  p.len_q = static_cast<int>(Nq);
  p.len_k = static_cast<int>(Nk);
  p.head_dim = static_cast<int>(D);
  p.group = static_cast<int>(Hq / Hkv);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.is_causal = is_causal;
  p.dout = dout.data_ptr();
  p.dout_stride = strides_of(dout);
  p.out_saved = out.data_ptr();
  p.out_stride = strides_of(out);
  p.lse_saved = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk_heads.data_ptr();
  p.dv = dv_heads.data_ptr();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dq_accum_rows = static_cast<int>(dq_accum_rows);
  p.softmax_d = softmax_d.data_ptr<float>();
  p.max_smem_per_block = max_smem;
  p.use_sm90 = sm90;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kHalf) {
    run_bwd_hdim<__half>(p, D, stream);
  } else {
    run_bwd_hdim<__nv_bfloat16>(p, D, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (Hq == Hkv) return {dq, dk_heads, dv_heads};
  const int64_t G = Hq / Hkv;
  auto group_sum = [&](const at::Tensor& t) {
    return t.view({B, Hkv, G, Nk, D}).sum(2, /*keepdim=*/false, at::kFloat).to(dtype);
  };
  return {dq, group_sum(dk_heads), group_sum(dv_heads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn, CUDA, m) { m.impl("bwd", &bwd_cuda); }
