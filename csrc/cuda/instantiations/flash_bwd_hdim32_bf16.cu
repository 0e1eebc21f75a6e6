// Backward kernels for head dim 32, bf16.
#include "flash_bwd_kernel.cuh"

template void flash::run_bwd<__nv_bfloat16, 32>(const flash::BwdParams&, cudaStream_t);
