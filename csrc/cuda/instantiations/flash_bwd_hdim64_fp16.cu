// Backward kernels for head dim 64, fp16.
#include "flash_bwd_kernel.cuh"

template void flash::run_bwd<__half, 64>(const flash::BwdParams&, cudaStream_t);
