// Parameters and launchers of the CUDA fused residual add + LayerNorm (add_layernorm_cuda.cu), filled by
// the API layer (add_layernorm_cuda_api.cpp). Plain data: no torch headers, so the kernels compile with
// nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flash {
namespace addln {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Every tensor is contiguous: rows of `width` elements, one after another.
struct FwdParams {
  DType dtype;
  const void* x;         // (rows, width)
  const void* residual;  // (rows, width)
  const void* weight;    // (width,)
  const void* bias;      // (width,) or nullptr
  void* y;               // (rows, width)
  void* s;               // (rows, width)
  float* mean;           // (rows,)
  float* rstd;           // (rows,)
  int64_t rows;
  int64_t width;
  float eps;
  int num_sms;  // multiprocessors of the device (grid sizing)
};

struct BwdParams {
  DType dtype;
  const void* dy;      // (rows, width)
  const void* ds;      // (rows, width) or nullptr
  const void* s;       // (rows, width)
  const float* mean;   // (rows,)
  const float* rstd;   // (rows,)
  const void* weight;  // (width,)
  void* dx;            // (rows, width)
  void* dweight;       // (width,)
  void* dbias;         // (width,)
  int64_t rows;
  int64_t width;
  int num_sms;
  // Scratch from the API layer: (2, plan.partial_rows, width) float32, the per-block partial sums of
  // dweight and dbias. The kernels write every element before reading it (no zeroing needed).
  float* partials;
};

// The launch shape of a backward call, fixed before the API layer allocates the scratch.
struct BwdPlan {
  bool vectorized;       // 16-byte loads with the row cached in registers, else the scalar loop
  int threads_per_row;   // threads that share one row
  int64_t grid;          // blocks
  int64_t partial_rows;  // rows of the partial-sum scratch
};

// rows >= 1 and width >= 1 (the API layer returns early otherwise).
void run_fwd(const FwdParams& params, cudaStream_t stream);
BwdPlan plan_bwd(const BwdParams& params);
void run_bwd(const BwdParams& params, const BwdPlan& plan, cudaStream_t stream);

}  // namespace addln
}  // namespace flash
