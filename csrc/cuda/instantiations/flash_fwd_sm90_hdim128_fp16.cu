// Hopper forward kernel instantiation: head dim 128, fp16.
#include "../flash_fwd_sm90_kernel.cuh"

namespace flash {
template void run_fwd_sm90<__half, 128>(const FwdParams&, cudaStream_t);
}  // namespace flash
