// Backward kernels for head dim 32, fp16.
#include "flash_bwd_kernel.cuh"

template void flash::run_bwd<__half, 32>(const flash::BwdParams&, cudaStream_t);
