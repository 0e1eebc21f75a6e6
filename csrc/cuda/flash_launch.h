// Launchers, one explicit instantiation per (element type, head dim) in instantiations/*.cu.
// Element types: cutlass-free, __half and __nv_bfloat16.
#pragma once

#include <cuda_runtime.h>

#include "flash_params.h"

namespace flash {

template <typename Element, int HeadDim>
void run_fwd(const FwdParams& params, cudaStream_t stream);

// The same forward on Hopper's warpgroup MMAs (sm_90a builds, sm_90 devices; head dims 64 and 128).
template <typename Element, int HeadDim>
void run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

// Split-KV forward (params.num_splits >= 2): the split kernel, then the merge into out and lse.
template <typename Element, int HeadDim>
void run_fwd_split(const FwdParams& params, cudaStream_t stream);

// Resident blocks per SM of the split kernel on the current device (for the split heuristic).
template <typename Element, int HeadDim>
int fwd_split_blocks_per_sm();

template <typename Element, int HeadDim>
void run_bwd(const BwdParams& params, cudaStream_t stream);

// The backward's dK, dV and dQ on Hopper's warpgroup MMAs (sm_90a builds, sm_90 devices; head dims 64 and
// 128; run_bwd calls it where params.use_sm90, after softmax_d).
template <typename Element, int HeadDim>
void run_bwd_sm90(const BwdParams& params, cudaStream_t stream);

}  // namespace flash
