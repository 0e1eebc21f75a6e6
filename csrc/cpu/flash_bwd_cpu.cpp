// CPU implementation of flash_attn::bwd (FlashAttention-2 backward: probabilities recomputed tile by
// tile from the saved log-sum-exp, O(N) extra memory).
//
// As for the forward, the kernel body (flash_bwd_cpu_kernel.h) is compiled for AVX-512, AVX2 and the
// baseline target and picked at run time. Parallel scheme (at::parallel_for):
//  1. delta = rowsum(dout * out) over (batch, query head) tasks; for float64 also the log-sum-exp in
//     float64 over (batch, query head, query tile) tasks (the saved lse is float32);
//  2. either one pass over (batch, kv head) tasks, each computing dk/dv of its kv head and dq of the
//     query heads of its group (no two tasks write the same rows), used when these tasks keep the
//     threads busy; or two passes, dk/dv over (batch, kv head, key tile) tasks and then dq over
//     (batch, query head, query tile) tasks, used when there are too few (batch, kv head) pairs.
// FLASH_ATTN_CPU_BWD=grouped|split forces a scheme (for tests and measurements).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "../flash_checks.h"
#include "flash_cpu_common.h"

#define FLASH_CPU_KERNEL_HEADER "flash_bwd_cpu_kernel.h"
#include "flash_cpu_isa_variants.h"
#undef FLASH_CPU_KERNEL_HEADER

namespace flash {
namespace cpu {
namespace {

constexpr const char* kBwdOp = "flash_attn.bwd";

BwdKernels select_bwd() {
  switch (select_isa()) {
#if FLASH_CPU_MULTI_ISA
    case Isa::kAvx512: return avx512::bwd_kernels();
    case Isa::kAvx2: return avx2::bwd_kernels();
#endif
    default: return generic::bwd_kernels();
  }
}

// The split scheme costs about 1.6x the grouped one in total (it recomputes S and dP for dq); grouped is
// used unless its (batch, kv head) tasks would leave the threads idle for more than ~40% of the time.
bool use_grouped_scheme(int64_t tasks) {
  const char* env = std::getenv("FLASH_ATTN_CPU_BWD");
  if (env != nullptr && std::strcmp(env, "grouped") == 0) return true;
  if (env != nullptr && std::strcmp(env, "split") == 0) return false;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t rounds = ceil_div(tasks, threads);
  return 5 * tasks >= 3 * threads * rounds;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& seqlens_k, double scale, bool is_causal) {
  const AttnShape s = check_backward_inputs(kBwdOp, dout, q, k, v, out, lse, key_padding_mask, seqlens_k);
  const DType dtype = check_cpu_dtype_and_head_dim(kBwdOp, q, s.head_dim);
  const at::ScalarType compute = dtype == DType::kFloat64 ? at::kDouble : at::kFloat;

  at::Tensor dq = at::empty({s.batch, s.heads_q, s.len_q, s.head_dim}, q.options());
  at::Tensor dk = at::empty({s.batch, s.heads_kv, s.len_k, s.head_dim}, k.options());
  at::Tensor dv = at::empty({s.batch, s.heads_kv, s.len_k, s.head_dim}, v.options());
  if (poison_outputs()) {
    dq.fill_(std::numeric_limits<double>::quiet_NaN());
    dk.fill_(std::numeric_limits<double>::quiet_NaN());
    dv.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (s.batch == 0 || s.heads_q == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  // lse is read with flat indexing.
  const at::Tensor lse_c = lse.contiguous();
  // dq is accumulated in the compute type: in dq itself for float32/float64, else in a float32 buffer.
  at::Tensor dq_acc = dtype == DType::kBFloat16
                          ? at::empty({s.batch, s.heads_q, s.len_q, s.head_dim}, q.options().dtype(compute))
                          : dq;
  at::Tensor delta = at::empty({s.batch, s.heads_q, s.len_q}, q.options().dtype(compute));

  BwdParams p;
  fill_attn_params(p, dtype, s, q, k, v, key_padding_mask, seqlens_k, scale, is_causal);
  p.dout = dout.data_ptr();
  p.out = out.data_ptr();
  p.dout_stride = {dout.stride(0), dout.stride(1), dout.stride(2)};
  p.out_stride = {out.stride(0), out.stride(1), out.stride(2)};
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr();
  p.dq_acc = dq_acc.data_ptr();
  at::Tensor lse2_exact;
  p.lse2_exact = nullptr;
  if (dtype == DType::kFloat64) {
    lse2_exact = at::empty({s.batch, s.heads_q, s.len_q}, q.options());
    p.lse2_exact = lse2_exact.data_ptr();
  }
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();

  const BwdKernels kernels = select_bwd();
  at::parallel_for(0, s.batch * s.heads_q, 1,
                   [&](int64_t begin, int64_t end) { kernels.delta(p, begin, end); });
  const int64_t query_tile_tasks = s.batch * s.heads_q * ceil_div(s.len_q, kBwdBlockQ);
  if (p.lse2_exact != nullptr) {
    at::parallel_for(0, query_tile_tasks, 1,
                     [&](int64_t begin, int64_t end) { kernels.lse_exact(p, begin, end); });
  }
  const int64_t group_tasks = s.batch * s.heads_kv;
  if (use_grouped_scheme(group_tasks)) {
    at::parallel_for(0, group_tasks, 1, [&](int64_t begin, int64_t end) { kernels.grouped(p, begin, end); });
  } else {
    const int64_t dkdv_tasks = group_tasks * ceil_div(s.len_k, kBwdBlockK);
    at::parallel_for(0, dkdv_tasks, 1, [&](int64_t begin, int64_t end) { kernels.dkdv(p, begin, end); });
    at::parallel_for(0, query_tile_tasks, 1, [&](int64_t begin, int64_t end) { kernels.dq(p, begin, end); });
  }
  if (dtype == DType::kBFloat16) dq.copy_(dq_acc);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cpu
}  // namespace flash

TORCH_LIBRARY_IMPL(flash_attn, CPU, m) { m.impl("bwd", &flash::cpu::bwd_cpu); }
