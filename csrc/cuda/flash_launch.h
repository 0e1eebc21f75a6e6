// Launchers, one explicit instantiation per (element type, head dim) in instantiations/*.cu.
// Element types: cutlass-free, __half and __nv_bfloat16.
#pragma once

#include <cuda_runtime.h>

#include "flash_params.h"

namespace flash {

template <typename Element, int HeadDim>
void run_fwd(const FwdParams& params, cudaStream_t stream);

template <typename Element, int HeadDim>
void run_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace flash
