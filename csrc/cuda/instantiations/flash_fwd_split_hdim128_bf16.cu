// Split-KV forward and merge kernels: head dim 128, bf16.
#include "../flash_fwd_split_kernel.cuh"

namespace flash {
template void run_fwd_split<__nv_bfloat16, 128>(const FwdParams&, cudaStream_t);
template int fwd_split_blocks_per_sm<__nv_bfloat16, 128>();
}  // namespace flash
