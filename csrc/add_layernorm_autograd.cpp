// Autograd of flash_attn::add_layernorm_fwd, registered at the Autograd key (for the reason flash_autograd.cpp
// gives: no Python wrapper on every call). The gradient of the sum s reaches x and residual alike; y's
// gradient goes through add_layernorm_bwd, which adds s's own. mean and rstd are not differentiable, and an
// output whose gradient is not needed passes an undefined one (no zeros are made for it).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                    const at::Tensor& weight, const OptTensor& bias,
                                                                    double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flash_attn::add_layernorm_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double)>();
  return op.call(x, residual, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(const at::Tensor& dy, const OptTensor& ds, const at::Tensor& s,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        const at::Tensor& weight) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flash_attn::add_layernorm_bwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&)>();
  return op.call(dy, ds, s, mean, rstd, weight);
}

// The kernels read the last dim with stride 1 (a last dim of size 1 has any stride).
at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}

}  // namespace

namespace flash {

// The autograd node shows as torch::autograd::CppNode<flash::AddLayerNormFunction> (grad_fn.name()).
class AddLayerNormFunction : public torch::autograd::Function<AddLayerNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, const OptTensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, s, mean, rstd] = call_fwd(x, residual, weight, bias, eps);
    ctx->save_for_backward({s, mean, rstd, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {y, s, mean, rstd};
  }

  // grads: d y, d s (d mean, d rstd: not differentiable). Returns the gradients of x, residual, weight, bias, eps.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& s = saved[0];
    const at::Tensor& dy = grads[0];
    const at::Tensor& ds = grads[1];
    if (!dy.defined()) {  // only s was used: y contributes nothing
      const at::Tensor dsum = ds.defined() ? ds : at::zeros_like(s);
      return {dsum, dsum, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto [dsum, dweight, dbias] =
        call_bwd(last_dim_contiguous(dy), ds.defined() ? OptTensor(last_dim_contiguous(ds)) : std::nullopt, s,
                 saved[1], saved[2], saved[3]);
    return {dsum, dsum, dweight, ctx->saved_data["has_bias"].toBool() ? dbias : at::Tensor(), at::Tensor()};
  }
};

}  // namespace flash

namespace {


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& x, const at::Tensor& residual,
                                                                        const at::Tensor& weight, const OptTensor& bias,
                                                                        double eps) {
  const variable_list outs = flash::AddLayerNormFunction::apply(x, residual, weight, bias, eps);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn, Autograd, m) { m.impl("add_layernorm_fwd", &fwd_autograd); }
