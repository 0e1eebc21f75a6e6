// Hopper backward kernel instantiation: head dim 64, bf16.
#include "../flash_bwd_sm90_kernel.cuh"

namespace flash {
template void run_bwd_sm90<__nv_bfloat16, 64>(const BwdParams&, cudaStream_t);
}  // namespace flash
