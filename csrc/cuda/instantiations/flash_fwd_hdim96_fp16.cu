// Forward kernel instantiation: head dim 96, fp16.
#include "../flash_fwd_kernel.cuh"

namespace flash {
template void run_fwd<__half, 96>(const FwdParams&, cudaStream_t);
}  // namespace flash
