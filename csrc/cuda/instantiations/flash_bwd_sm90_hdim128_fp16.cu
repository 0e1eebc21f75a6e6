// Hopper backward kernel instantiation: head dim 128, fp16.
#include "../flash_bwd_sm90_kernel.cuh"

namespace flash {
template void run_bwd_sm90<__half, 128>(const BwdParams&, cudaStream_t);
}  // namespace flash
