// Compiles the kernel header named by FLASH_CPU_KERNEL_HEADER once per instruction set: AVX-512 and AVX2
// (GCC only, chosen at run time) and a portable baseline. Each copy lives in its own namespace, named by
// FLASH_CPU_ISA, and sees FLASH_CPU_VBYTES (vector width) and FLASH_CPU_ISA_LEVEL.
// No include guard: each kernel file includes this once with its own header.

#if FLASH_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2")
#define FLASH_CPU_ISA avx512
#define FLASH_CPU_VBYTES 64
#define FLASH_CPU_ISA_LEVEL 2
#include FLASH_CPU_KERNEL_HEADER
#undef FLASH_CPU_ISA
#undef FLASH_CPU_VBYTES
#undef FLASH_CPU_ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define FLASH_CPU_ISA avx2
#define FLASH_CPU_VBYTES 32
#define FLASH_CPU_ISA_LEVEL 1
#include FLASH_CPU_KERNEL_HEADER
#undef FLASH_CPU_ISA
#undef FLASH_CPU_VBYTES
#undef FLASH_CPU_ISA_LEVEL
#pragma GCC pop_options
#endif

#define FLASH_CPU_ISA generic
#define FLASH_CPU_VBYTES 16
#define FLASH_CPU_ISA_LEVEL 0
#include FLASH_CPU_KERNEL_HEADER
#undef FLASH_CPU_ISA
#undef FLASH_CPU_VBYTES
#undef FLASH_CPU_ISA_LEVEL
