// Device-dependent input checks of the CUDA API layer (torch headers; not included by the kernels).
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>

namespace flash {

// Opt-in shared memory per block of `device`, in bytes (227 KB on sm_90, 163 KB on sm_80, 99 KB on
// sm_86 / sm_89). Asked of the runtime once per device, then cached: every attention call reads it.
inline int max_smem_per_block(const c10::Device& device) {
  static std::mutex mutex;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device.index());
  if (it != cache.end()) return it->second;
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  cache.emplace(device.index(), bytes);
  return bytes;
}

// Compute capability major of `device` (9 on H100 / H200), asked of the runtime once per device.
inline int compute_capability_major(const c10::Device& device) {
  static std::mutex mutex;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device.index());
  if (it != cache.end()) return it->second;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  cache.emplace(device.index(), major);
  return major;
}

// NotImplementedError, before any launch, when the kernels of `op` for this head dim need more shared
// memory per block than the device offers.
inline void check_smem_fits(const char* op, int64_t head_dim, int need_bytes, const c10::Device& device,
                            int have_bytes) {
  TORCH_CHECK_NOT_IMPLEMENTED(need_bytes <= have_bytes, op, ": head dim ", head_dim, " needs ", need_bytes / 1024,
                              " KB of shared memory per block; this GPU (", device, ") offers ",
                              have_bytes / 1024, " KB");
}

}  // namespace flash
