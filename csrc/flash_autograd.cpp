// Autograd of flash_attn::fwd, registered at the Autograd key: the forward saves what the backward op needs,
// and the backward calls flash_attn::bwd. In C++ rather than through torch.library.register_autograd because
// that Python wrapper runs on every call and cost 25 µs of host time per call with autograd recording, 4 µs
// without (scripts/host_overhead.py, docs/perf.md v26); the ops' fake kernels stay in Python
// (attention_backends/flash_ops.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const OptTensor& key_padding_mask, const OptTensor& seqlens_k,
                                            double scale, bool is_causal) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flash_attn::fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const OptTensor&, const OptTensor&, double, bool)>();
  return op.call(q, k, v, key_padding_mask, seqlens_k, scale, is_causal);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        const OptTensor& key_padding_mask,
                                                        const OptTensor& seqlens_k, double scale, bool is_causal) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flash_attn::bwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const OptTensor&, const OptTensor&, double, bool)>();
  return op.call(dout, q, k, v, out, lse, key_padding_mask, seqlens_k, scale, is_causal);
}

// An absent optional tensor is saved as an undefined tensor and comes back as nullopt.
OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

}  // namespace

namespace flash {

// The autograd node shows as torch::autograd::CppNode<flash::FlashAttentionFunction> (grad_fn.name()).
class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& key_padding_mask, const OptTensor& seqlens_k, double scale,
                               bool is_causal) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = call_fwd(q, k, v, key_padding_mask, seqlens_k, scale, is_causal);
    ctx->save_for_backward({q, k, v, out, lse, key_padding_mask.value_or(at::Tensor()),
                            seqlens_k.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  // grads: d out, d lse (lse is not differentiable: ignored).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& out = saved[3];
    at::Tensor dout = grads[0];
    if (!dout.defined()) {
      dout = at::zeros_like(out);
    } else if (dout.stride(-1) != 1) {
      dout = dout.contiguous();
    }
    auto [dq, dk, dv] = call_bwd(dout, saved[0], saved[1], saved[2], out, saved[4], optional_of(saved[5]),
                                 optional_of(saved[6]), ctx->saved_data["scale"].toDouble(),
                                 ctx->saved_data["is_causal"].toBool());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace flash

namespace {


std::tuple<at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const OptTensor& key_padding_mask, const OptTensor& seqlens_k,
                                                double scale, bool is_causal) {
  const variable_list outs = flash::FlashAttentionFunction::apply(q, k, v, key_padding_mask, seqlens_k, scale, is_causal);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn, Autograd, m) { m.impl("fwd", &fwd_autograd); }
