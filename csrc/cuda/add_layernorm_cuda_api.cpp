// CUDA implementation of flash_attn::add_layernorm_fwd / add_layernorm_bwd: input checks, output and
// scratch allocation, parameters, and the launch (kernels in add_layernorm_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

#include "../add_layernorm_checks.h"
#include "add_layernorm_cuda.h"

namespace flash {
namespace {

addln::DType element_type(at::ScalarType dtype) {
  if (dtype == at::kHalf) return addln::DType::kFloat16;
  if (dtype == at::kBFloat16) return addln::DType::kBFloat16;
  return addln::DType::kFloat32;
}

int num_sms(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& residual_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  const AddLnShape shape = check_add_layernorm_fwd_inputs(x_in, residual_in, weight_in, bias_in, eps);
  check_add_layernorm_dtype(kAddLnFwdOp, "x", x_in);
  FLASH_CHECK_VALUE(x_in.is_cuda(), kAddLnFwdOp, ": expected x on a CUDA device, got ", x_in.device());
  c10::cuda::CUDAGuard device_guard(x_in.device());

  AddLnFwdTensors t = prepare_add_layernorm_fwd(x_in, residual_in, weight_in, bias_in);
  const at::Tensor &x = t.x, &residual = t.residual, &weight = t.weight;
  const std::optional<at::Tensor>& bias = t.bias;
  at::Tensor &y = t.y, &s = t.s, &mean = t.mean, &rstd = t.rstd;
  if (shape.rows == 0) return {y, s, mean, rstd};

  addln::FwdParams p{};
  p.dtype = element_type(x.scalar_type());
  p.x = x.const_data_ptr();
  p.residual = residual.const_data_ptr();
  p.weight = weight.const_data_ptr();
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.y = y.mutable_data_ptr();
  p.s = s.mutable_data_ptr();
  p.mean = mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.rows = shape.rows;
  p.width = shape.width;
  p.eps = static_cast<float>(eps);
  p.num_sms = num_sms(x.device());
  addln::run_fwd(p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd_cuda(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& ds_in, const at::Tensor& s_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const at::Tensor& weight_in) {
  const AddLnShape shape = check_add_layernorm_bwd_inputs(dy_in, ds_in, s_in, mean_in, rstd_in, weight_in);
  check_add_layernorm_dtype(kAddLnBwdOp, "s", s_in);
  FLASH_CHECK_VALUE(s_in.is_cuda(), kAddLnBwdOp, ": expected s on a CUDA device, got ", s_in.device());
  c10::cuda::CUDAGuard device_guard(s_in.device());

  AddLnBwdTensors t = prepare_add_layernorm_bwd(dy_in, ds_in, s_in, mean_in, rstd_in, weight_in, shape);
  const at::Tensor &dy = t.dy, &s = t.s, &mean = t.mean, &rstd = t.rstd, &weight = t.weight;
  const std::optional<at::Tensor>& ds = t.ds;
  at::Tensor &dx = t.dx, &dweight = t.dweight, &dbias = t.dbias;
  if (shape.rows == 0) return {dx, dweight, dbias};

  addln::BwdParams p{};
  p.dtype = element_type(s.scalar_type());
  p.dy = dy.const_data_ptr();
  p.ds = ds.has_value() ? ds->const_data_ptr() : nullptr;
  p.s = s.const_data_ptr();
  p.mean = mean.const_data_ptr<float>();
  p.rstd = rstd.const_data_ptr<float>();
  p.weight = weight.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.dweight = dweight.mutable_data_ptr();
  p.dbias = dbias.mutable_data_ptr();
  p.rows = shape.rows;
  p.width = shape.width;
  p.num_sms = num_sms(s.device());
  const addln::BwdPlan plan = addln::plan_bwd(p);
  at::Tensor partials = at::empty({2, plan.partial_rows, shape.width}, s.options().dtype(at::kFloat));
  poison({&partials});
  p.partials = partials.mutable_data_ptr<float>();
  addln::run_bwd(p, plan, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace flash

TORCH_LIBRARY_IMPL(flash_attn, CUDA, m) {
  m.impl("add_layernorm_fwd", &flash::add_layernorm_fwd_cuda);
  m.impl("add_layernorm_bwd", &flash::add_layernorm_bwd_cuda);
}
