// Backward kernels for head dim 128, fp16.
#include "flash_bwd_kernel.cuh"

template void flash::run_bwd<__half, 128>(const flash::BwdParams&, cudaStream_t);
