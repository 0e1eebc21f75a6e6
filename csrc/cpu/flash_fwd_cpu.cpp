// CPU implementation of flash_attn::fwd (FlashAttention-2 forward, tiled, online softmax).
//
// The kernel body (flash_fwd_cpu_kernel.h) is compiled three times: for AVX-512, for AVX2 and for the
// baseline target; the best one the CPU supports is picked at run time, so the build needs no -march
// flag. Work is split with at::parallel_for over (batch, query head, query tile) tasks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../flash_checks.h"
#include "flash_cpu_common.h"

#define FLASH_CPU_KERNEL_HEADER "flash_fwd_cpu_kernel.h"
#include "flash_cpu_isa_variants.h"
#undef FLASH_CPU_KERNEL_HEADER

namespace flash {
namespace cpu {

namespace {

constexpr const char* kFwdOp = "flash_attn.fwd";

FwdFn select_fwd() {
  switch (select_isa()) {
#if FLASH_CPU_MULTI_ISA
    case Isa::kAvx512: return &avx512::fwd_tasks;
    case Isa::kAvx2: return &avx2::fwd_tasks;
#endif
    default: return &generic::fwd_tasks;
  }
}

}  // namespace

namespace {

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& key_padding_mask,
                                           const std::optional<at::Tensor>& seqlens_k, double scale,
                                           bool is_causal) {
  const AttnShape s = check_attention_inputs(kFwdOp, q, k, v, key_padding_mask, seqlens_k);
  const DType dtype = check_cpu_dtype_and_head_dim(kFwdOp, q, s.head_dim);

  at::Tensor out = at::empty({s.batch, s.heads_q, s.len_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.len_q}, q.options().dtype(at::kFloat));
  if (poison_outputs()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    lse.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  const int64_t ntasks = s.batch * s.heads_q * ceil_div(s.len_q, kFwdBlockQ);
  if (ntasks == 0) return {out, lse};

  FwdParams p;
  fill_attn_params(p, dtype, s, q, k, v, key_padding_mask, seqlens_k, scale, is_causal);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();

  const FwdFn fn = select_fwd();
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  return {out, lse};
}

}  // namespace
}  // namespace cpu
}  // namespace flash

TORCH_LIBRARY_IMPL(flash_attn, CPU, m) { m.impl("fwd", &flash::cpu::fwd_cpu); }
