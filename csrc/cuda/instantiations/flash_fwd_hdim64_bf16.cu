// Forward kernel instantiation: head dim 64, bf16.
#include "../flash_fwd_kernel.cuh"

namespace flash {
template void run_fwd<__nv_bfloat16, 64>(const FwdParams&, cudaStream_t);
}  // namespace flash
