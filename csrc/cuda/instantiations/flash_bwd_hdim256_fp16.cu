// Backward kernels for head dim 256, fp16.
#include "flash_bwd_kernel.cuh"

template void flash::run_bwd<__half, 256>(const flash::BwdParams&, cudaStream_t);
