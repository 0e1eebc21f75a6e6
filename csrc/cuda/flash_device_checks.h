// Device-dependent input checks of the CUDA API layer (torch headers; not included by the kernels).
#pragma once

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "../flash_checks.h"

namespace flash {

// An attribute of `device`, asked of the runtime once per (device, attribute), then cached: every
// attention call reads some.
inline int cached_device_attribute(const c10::Device& device, cudaDeviceAttr attr) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const std::pair<int, int> key{device.index(), static_cast<int>(attr)};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device.index()));
  cache.emplace(key, value);
  return value;
}

// Opt-in shared memory per block, in bytes (227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86 / sm_89).
inline int max_smem_per_block(const c10::Device& device) {
  return cached_device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

// Compute capability major (9 on H100 / H200).
inline int compute_capability_major(const c10::Device& device) {
  return cached_device_attribute(device, cudaDevAttrComputeCapabilityMajor);
}

// NotImplementedError, before any launch, when the kernels of `op` for this head dim need more shared
// memory per block than the device offers.
inline void check_smem_fits(const char* op, int64_t head_dim, int need_bytes, const c10::Device& device,
                            int have_bytes) {
  TORCH_CHECK_NOT_IMPLEMENTED(need_bytes <= have_bytes, op, ": head dim ", head_dim, " needs ", need_bytes / 1024,
                              " KB of shared memory per block; this GPU (", device, ") offers ",
                              have_bytes / 1024, " KB");
}

// An environment variable of `op` that is 0, 1 or unset (nullopt); other values raise a ValueError naming it.
inline std::optional<bool> env_flag(const char* op, const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return std::nullopt;
  FLASH_CHECK_VALUE(std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0, op,
                    ": expected the environment variable ", name, " to be 0 or 1 (or unset), got '", env, "'");
  return env[0] == '1';
}

}  // namespace flash
