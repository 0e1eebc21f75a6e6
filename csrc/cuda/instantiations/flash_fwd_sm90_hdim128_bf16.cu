// Hopper forward kernel instantiation: head dim 128, bf16.
#include "../flash_fwd_sm90_kernel.cuh"

namespace flash {
template void run_fwd_sm90<__nv_bfloat16, 128>(const FwdParams&, cudaStream_t);
}  // namespace flash
