// Hopper (sm_90a) bulk tensor copies (TMA) into shared memory, completed on mbarriers, and the host side
// that describes a (B, H, N, D) tensor to the copy engine (a tensor map).
//
// One thread arms a barrier with the bytes it expects (mbar_arrive_expect_tx) and issues the copies
// (tma_load_4d); the copy engine writes the tile, 128-byte swizzled like wgmma.cuh's tiles, and counts its
// bytes on the barrier; every thread that reads the tile waits for the barrier's phase (mbar_wait). Rows
// past the tensor's end are written as zeros. A barrier completes one phase per use: the n-th use of a
// barrier (from 0) waits for parity n % 2.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flash_params.h"

namespace flash {
namespace sm90 {

// The tensor maps of K and V, passed by value as a __grid_constant__ kernel parameter.
struct KvTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
  CUtensorMap o;  // the output, 64-row boxes (FwdSm90Traits::kTmaStoreO)
  CUtensorMap q;  // Q, kBlockM-row boxes (FwdSm90Traits::kWarpSpec)
};
// The backward's: Q and dO (flash_bwd_sm90_kernel.cuh, kTmaQdo).
struct QdoTensorMaps {
  CUtensorMap q;
  CUtensorMap dout;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Invalidates a barrier (no pending arrivals or copies on it) so that mbar_init may set it up again.
__device__ __forceinline__ void mbar_inval(uint32_t bar) {
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Makes initialised barriers visible to the copy engine (before the block barrier that publishes them).
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_loop:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra.uni wait_loop;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// One arrival of this thread on bar (release: its earlier shared-memory accesses come before the phase
// completes for the threads that wait on it).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// An arrival on bar once every cp.async this thread issued before has landed; counted against the arrivals
// the barrier was initialised with (.noinc).
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Box {64 elements, rows, 1, 1} of the tensor map at coordinates {col, row, head, batch} into dst
// (1024-byte aligned), counted on bar.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int col, int row,
                                            int head, int batch) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(bar)
      : "memory");
}

// The same box fetched into L2 only (a hint: no barrier, nothing written to shared memory).
__device__ __forceinline__ void tma_prefetch_l2_4d(const CUtensorMap* map, int col, int row, int head, int batch) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(col), "r"(row), "r"(head), "r"(batch)
               : "memory");
}

// Box {64 elements, rows, 1, 1} from src (1024-byte aligned, swizzled like a loaded box) into the tensor map's
// tensor at {col, row, head, batch}, in a bulk group of the calling thread (bulk_commit, bulk_wait_read in
// wgmma.cuh); rows past the tensor's end are not written. Shared memory written through the generic proxy is
// fenced (fence_proxy_async) before the issue.
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, uint32_t src, int col, int row, int head,
                                             int batch) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(col), "r"(row), "r"(head), "r"(batch), "r"(src)
               : "memory");
}

}  // namespace sm90

// Host: a tensor map of a (batch, heads, rows, head_dim) 16-bit tensor (strides in elements, last dim
// contiguous) whose box is 64 columns x box_rows rows of one (batch, head), 128-byte swizzled. Returns
// false when the copy engine cannot address the tensor (a stride the driver refuses, e.g. not a multiple
// of 16 bytes); the caller then copies with cp.async.
bool make_tensor_map_4d(CUtensorMap* map, const void* base, bool bf16, int batch, int heads, int rows,
                        int head_dim, const Strides4& strides, int box_rows);

}  // namespace flash
