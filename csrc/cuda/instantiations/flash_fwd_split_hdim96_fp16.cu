// Split-KV forward and merge kernels: head dim 96, fp16.
#include "../flash_fwd_split_kernel.cuh"

namespace flash {
template void run_fwd_split<__half, 96>(const FwdParams&, cudaStream_t);
template int fwd_split_blocks_per_sm<__half, 96>();
}  // namespace flash
