// Forward kernel instantiation: head dim 32, bf16.
#include "../flash_fwd_kernel.cuh"

namespace flash {
template void run_fwd<__nv_bfloat16, 32>(const FwdParams&, cudaStream_t);
}  // namespace flash
