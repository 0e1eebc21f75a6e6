// Forward kernel instantiation: head dim 256, bf16.
#include "../flash_fwd_kernel.cuh"

namespace flash {
template void run_fwd<__nv_bfloat16, 256>(const FwdParams&, cudaStream_t);
}  // namespace flash
