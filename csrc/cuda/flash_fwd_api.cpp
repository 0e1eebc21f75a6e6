// CUDA implementation of flash_attn::fwd: input checks, output allocation, FwdParams, the choice
// between the one-pass kernel (run_fwd) and the split-KV path (run_fwd_split: keys split across
// blocks, partials merged by log-sum-exp), and dispatch on (dtype, head dim) to the kernels in
// cuda/instantiations/flash_fwd_*.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>

#include "../flash_checks.h"
#include "flash_device_checks.h"
#include "flash_launch.h"
#include "flash_params.h"
#include "kernel_traits.h"

namespace flash {
namespace {

constexpr const char* kOp = "flash_attn.fwd";
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

// Split-KV heuristic: at most kMaxSplits splits, each at least kMinTilesPerSplit key tiles long.
constexpr int kMaxSplits = 128;
constexpr int64_t kMinTilesPerSplit = 2;
constexpr int64_t kOnePassBlockM = FwdConfig<128>::Traits::kBlockM;  // query rows of a one-pass block
constexpr int64_t kSplitBlockM = SplitConfig<128>::Traits::kBlockM;  // packed rows of a split block

// The kernel copies 16-byte chunks: the base pointer and every stride it multiplies by a possibly
// non-zero index (batch, head, row) must be multiples of 8 elements (16 bytes).
bool is_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// A fresh contiguous copy when t's layout does not suit the kernel's 16-byte copies.
at::Tensor aligned_view_or_copy(const at::Tensor& t) {
  if (is_16b_aligned(t)) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

Strides4 strides_of(const at::Tensor& t) { return Strides4{t.stride(0), t.stride(1), t.stride(2)}; }

// The split-KV path for num_splits >= 2, else the one-pass kernel (on wgmma where params.use_sm90).
template <typename Element, int HeadDim>
void run_fwd_any(const FwdParams& params, cudaStream_t stream) {
  if (params.num_splits > 1) {
    run_fwd_split<Element, HeadDim>(params, stream);
    return;
  }
  if constexpr (HeadDim == 64 || HeadDim == 128) {
    if (params.use_sm90) {
      run_fwd_sm90<Element, HeadDim>(params, stream);
      return;
    }
  }
  run_fwd<Element, HeadDim>(params, stream);
}

// The wgmma forward: a build with sm_90a code (FLASH_WITH_SM90A), an sm_90 device and head dim 64 or 128
// (on the H200, in one process with the v6 kernels: 1.17-1.28x (D = 64) and 1.31-1.42x (D = 128) SDPA
// flash, the mma.sync kernel 0.98-1.08x and 0.97-1.03x; the v8 kernels 1.38-1.46x and 1.35-1.53x on the
// grid: docs/perf.md). FLASH_ATTN_FWD_WGMMA=0 keeps the mma.sync kernel everywhere (to compare the two);
// =1 is the default.
bool use_sm90_forward(const c10::Device& device, int64_t head_dim) {
  const std::optional<bool> wgmma = env_flag(kOp, "FLASH_ATTN_FWD_WGMMA");
#ifdef FLASH_WITH_SM90A
  const bool off = wgmma.has_value() && !*wgmma;
  if (off || !(head_dim == 64 || head_dim == 128)) return false;
  return compute_capability_major(device) == 9;
#else
  (void)wgmma;
  (void)device;
  (void)head_dim;
  return false;
#endif
}

template <typename Element>
void dispatch_head_dim(const FwdParams& params, cudaStream_t stream) {
  switch (params.head_dim) {
    case 32: run_fwd_any<Element, 32>(params, stream); break;
    case 64: run_fwd_any<Element, 64>(params, stream); break;
    case 96: run_fwd_any<Element, 96>(params, stream); break;
    case 128: run_fwd_any<Element, 128>(params, stream); break;
    case 256: run_fwd_any<Element, 256>(params, stream); break;
    default: FLASH_CHECK_VALUE(false, kOp, ": no kernel for head dim ", params.head_dim);
  }
}

// ------------------------------------------------------------------------------------------------
// Split-KV ("flash-decoding") choice.
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// FLASH_ATTN_NUM_SPLITS=<n> forces n splits (1 = the one-pass kernel); unset or empty: 0, the
// heuristic decides.
int forced_num_splits() {
  const char* env = std::getenv("FLASH_ATTN_NUM_SPLITS");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  FLASH_CHECK_VALUE(*end == '\0' && n >= 1 && n <= kMaxSplits, kOp,
                    ": expected the environment variable FLASH_ATTN_NUM_SPLITS to be an integer in [1, ",
                    kMaxSplits, "], got '", env, "'");
  return static_cast<int>(n);
}

// Key tile of the split kernel per head dim (splits are whole tiles).
int split_block_n(int64_t head_dim) {
  switch (head_dim) {
    case 32: return SplitConfig<32>::Traits::kBlockN;
    case 64: return SplitConfig<64>::Traits::kBlockN;
    case 96: return SplitConfig<96>::Traits::kBlockN;
    case 128: return SplitConfig<128>::Traits::kBlockN;
    default: return SplitConfig<256>::Traits::kBlockN;
  }
}

template <typename Element>
int split_blocks_per_sm_of(int64_t head_dim) {
  switch (head_dim) {
    case 32: return fwd_split_blocks_per_sm<Element, 32>();
    case 64: return fwd_split_blocks_per_sm<Element, 64>();
    case 96: return fwd_split_blocks_per_sm<Element, 96>();
    case 128: return fwd_split_blocks_per_sm<Element, 128>();
    default: return fwd_split_blocks_per_sm<Element, 256>();
  }
}

// Shared memory per block of the one-pass and the split-KV forward kernels for this head dim.
template <template <int> class Config>
int smem_bytes_of(int64_t head_dim) {
  switch (head_dim) {
    case 32: return Config<32>::Traits::kSmemBytes;
    case 64: return Config<64>::Traits::kSmemBytes;
    case 96: return Config<96>::Traits::kSmemBytes;
    case 128: return Config<128>::Traits::kSmemBytes;
    default: return Config<256>::Traits::kSmemBytes;
  }
}

// What the heuristic needs of the device: its SM count and how many split-kernel blocks an SM holds.
struct SplitDeviceInfo {
  int num_sms;
  int blocks_per_sm;
};

// Asked of the CUDA runtime (device attribute, occupancy API) once per (device, dtype, D), then cached.
// The caller has made `device` current.
SplitDeviceInfo split_device_info(int device, at::ScalarType dtype, int64_t head_dim) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int64_t>, SplitDeviceInfo> cache;
  const auto key = std::make_tuple(device, static_cast<int>(dtype), head_dim);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = dtype == at::kBFloat16 ? split_blocks_per_sm_of<__nv_bfloat16>(head_dim)
                                            : split_blocks_per_sm_of<__half>(head_dim);
  const SplitDeviceInfo info{num_sms > 0 ? num_sms : 1, blocks};
  cache.emplace(key, info);
  return info;
}

// A grid keeps the GPU busy when its blocks cover at least 80 % of the SMs.
bool fills_gpu(int64_t blocks, int num_sms) { return 5 * blocks >= 4 * static_cast<int64_t>(num_sms); }

// Blocks of the one-pass kernel with block_m query rows per block: (B, Hq, Nq / block_m).
int64_t one_pass_blocks(const AttnShape& s, int64_t block_m) {
  return s.batch * s.heads_q * ceil_div(s.len_q, block_m);
}

// Tiles of the wgmma forward (head dim 64 or 128), in this order:
//  - small-grid tiles (64-row blocks) where the default's blocks would cover at most half of the SMs.
//    Measured at D = 128 (H200, 132 SMs; default 128-row blocks, one per SM): 64 blocks ran 11-14 % faster
//    as 128 64-row blocks, 104 blocks 11 % slower (docs/perf.md, v15);
//  - long-key tiles where the keys are at least kLongKeysMinLen and the long-key tiles' blocks still fill
//    the SMs. Measured at D = 64 (the only head dim where they differ from the default; 192-row blocks
//    against 8's 64-row ones): 1.01-1.10x at 8k and 16k keys, 0.74-0.98x at 1k and 4k; in a second call
//    1.02-1.06x at 6k and 7k, 0.99-1.05x at 5k, 0.92-0.94x at 4k (docs/perf.md, v16);
//  - else the default tiles.
// FLASH_ATTN_FWD_SM90_SMALL_GRID=1 / FLASH_ATTN_FWD_SM90_LONG_KEYS=1 take those tiles for every shape, =0
// never (tests and benchmarks); a forced small grid comes first. block_m: the rows of the small-grid tiles,
// which the split heuristic counts: where the other tiles run, twice their blocks fill the GPU.
constexpr int64_t kLongKeysMinLen = 6144;
struct Sm90TileChoice {
  Sm90Tiles tiles;
  int64_t block_m;
};
template <int HeadDim>
Sm90TileChoice choose_sm90_tiles_of(const AttnShape& s, int num_sms, std::optional<bool> forced_small_grid,
                                    std::optional<bool> forced_long_keys) {
  using Config = FwdSm90Config<HeadDim>;
  const int64_t small_rows = Config::SmallGridTraits::kBlockM;
  if (forced_small_grid.value_or(2 * one_pass_blocks(s, Config::Traits::kBlockM) <= num_sms)) {
    return {Sm90Tiles::kSmallGrid, small_rows};
  }
  const bool long_keys =
      s.len_k >= kLongKeysMinLen && one_pass_blocks(s, Config::LongKeysTraits::kBlockM) >= num_sms;
  if (forced_long_keys.value_or(long_keys)) return {Sm90Tiles::kLongKeys, small_rows};
  return {Sm90Tiles::kDefault, small_rows};
}
Sm90TileChoice choose_sm90_tiles(const AttnShape& s, int num_sms, std::optional<bool> forced_small_grid,
                                 std::optional<bool> forced_long_keys) {
  return s.head_dim == 64 ? choose_sm90_tiles_of<64>(s, num_sms, forced_small_grid, forced_long_keys)
                          : choose_sm90_tiles_of<128>(s, num_sms, forced_small_grid, forced_long_keys);
}

// Split-kernel blocks of one split: (packed row tiles of a key/value group) x B x Hkv.
int64_t split_blocks_per_split(const AttnShape& s) {
  const int64_t group = s.heads_q / s.heads_kv;
  return ceil_div(group * s.len_q, kSplitBlockM) * s.batch * s.heads_kv;
}

// The number of key splits, 1 for the one-pass kernel.
//  - Each split covers at least kMinTilesPerSplit key tiles; at most kMaxSplits splits.
//  - The one-pass kernel is kept when its (B, Hq, Nq / block_m) blocks fill the GPU (>= 80% of the SMs)
//    and its query tiles are not mostly padding (block_m: 128 rows for the mma.sync kernel, 64 for the
//    wgmma one: choose_sm90_tiles). With few queries per key/value head
//    (decoding: Nq * group well below 128) they are: each of its blocks multiplies 128 rows where a
//    few are real, and reads K/V once per query head, so the split kernel (16-row tiles, K/V read
//    once per group) is used even when the one-pass grid is large, with at least 2 splits.
//  - Otherwise the splits fill one wave of resident blocks: num_sms * blocks_per_sm.
//  - Finally every split gets the same number of tiles (no empty trailing split).
int heuristic_num_splits(const AttnShape& s, int block_n, int num_sms, int blocks_per_sm, int64_t block_m) {
  const int64_t n_tiles = ceil_div(s.len_k, block_n);
  const int64_t max_splits = std::min<int64_t>(kMaxSplits, n_tiles / kMinTilesPerSplit);
  if (max_splits < 2) return 1;
  const int64_t group = s.heads_q / s.heads_kv;
  const int64_t split_rows = ceil_div(group * s.len_q, kSplitBlockM) * kSplitBlockM;
  const int64_t one_pass_rows = group * ceil_div(s.len_q, block_m) * block_m;
  const bool mostly_padding = 2 * split_rows <= one_pass_rows;
  if (fills_gpu(one_pass_blocks(s, block_m), num_sms) && !mostly_padding) return 1;
  const int64_t per_split = split_blocks_per_split(s);
  int64_t splits = static_cast<int64_t>(num_sms) * blocks_per_sm / per_split;
  splits = std::min(std::max<int64_t>(splits, 2), max_splits);
  splits = std::min(splits, kIntMax / per_split);  // the grid is one int32 dimension
  if (splits < 2) return 1;
  return static_cast<int>(ceil_div(n_tiles, ceil_div(n_tiles, splits)));
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                            const at::Tensor& v_in,
                                            const std::optional<at::Tensor>& key_padding_mask,
                                            const std::optional<at::Tensor>& seqlens_k, double scale,
                                            bool is_causal) {
  const AttnShape s = check_attention_inputs(kOp, q_in, k_in, v_in, key_padding_mask, seqlens_k);
  FLASH_CHECK_VALUE(q_in.is_cuda(), kOp, ": expected q on a CUDA device, got ", q_in.device());
  const auto dtype = q_in.scalar_type();
  FLASH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16, kOp,
                   ": expected q to be float16 or bfloat16 on CUDA, got ", dtype);
  const int64_t D = s.head_dim;
  FLASH_CHECK_VALUE(D == 32 || D == 64 || D == 96 || D == 128 || D == 256, kOp,
                    ": expected head dim D in {32, 64, 96, 128, 256} on CUDA, got ", D);
  FLASH_CHECK_VALUE(s.batch <= kIntMax && s.heads_q <= kIntMax && s.len_q <= kIntMax && s.len_k <= kIntMax,
                    kOp, ": expected B, Hq, Nq and Nk to fit in int32, got q ", q_in.sizes(), ", k ",
                    k_in.sizes());
  FLASH_CHECK_VALUE(s.batch <= kMaxGridYZ && s.heads_q <= kMaxGridYZ, kOp,
                    ": expected B and Hq to be at most 65535 on CUDA, got B = ", s.batch,
                    ", Hq = ", s.heads_q);
  const int forced_splits = forced_num_splits();
  const std::optional<bool> forced_small_grid = env_flag(kOp, "FLASH_ATTN_FWD_SM90_SMALL_GRID");
  const std::optional<bool> forced_long_keys = env_flag(kOp, "FLASH_ATTN_FWD_SM90_LONG_KEYS");

  c10::cuda::CUDAGuard device_guard(q_in.device());
  const int max_smem = max_smem_per_block(q_in.device());

  at::Tensor out = at::empty({s.batch, s.heads_q, s.len_q, D}, q_in.options());
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.len_q}, q_in.options().dtype(at::kFloat));
  if (s.batch == 0 || s.heads_q == 0 || s.len_q == 0) return {out, lse};
  if (s.len_k == 0) {
    // Every row is fully masked.
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return {out, lse};
  }

  const at::Tensor q = aligned_view_or_copy(q_in);
  const at::Tensor k = aligned_view_or_copy(k_in);
  const at::Tensor v = aligned_view_or_copy(v_in);
  std::optional<at::Tensor> kpm;
  if (key_padding_mask.has_value()) kpm = *key_padding_mask;
  std::optional<at::Tensor> lens;
  if (seqlens_k.has_value()) lens = seqlens_k->contiguous();

  // Whether the one-pass kernel is the wgmma one (reads FLASH_ATTN_FWD_WGMMA on every call), and its tiles.
  const bool sm90 = use_sm90_forward(q_in.device(), D);
  const SplitDeviceInfo info = split_device_info(q_in.get_device(), dtype, D);
  const Sm90TileChoice sm90_tiles = sm90 ? choose_sm90_tiles(s, info.num_sms, forced_small_grid, forced_long_keys)
                                         : Sm90TileChoice{Sm90Tiles::kDefault, kOnePassBlockM};
  int num_splits = forced_splits;
  if (num_splits == 0) {
    num_splits = heuristic_num_splits(s, split_block_n(D), info.num_sms, info.blocks_per_sm, sm90_tiles.block_m);
  }
  // The split kernel where the device gives its blocks enough shared memory (sm_86 / sm_89 give 99 KB),
  // else the one-pass kernel; a forced split count is kept and checked.
  const int split_smem = smem_bytes_of<SplitConfig>(D);
  if (num_splits > 1 && forced_splits == 0 && split_smem > max_smem) num_splits = 1;
  check_smem_fits(kOp, D, num_splits > 1 ? split_smem : smem_bytes_of<FwdConfig>(D), q_in.device(), max_smem);
  FLASH_CHECK_VALUE(num_splits == 1 || split_blocks_per_split(s) <= kIntMax / num_splits, kOp,
                    ": FLASH_ATTN_NUM_SPLITS = ", num_splits, " makes more than 2^31 - 1 blocks for q ",
                    q_in.sizes(), " and k ", k_in.sizes());
  at::Tensor out_accum, lse_accum;
  if (num_splits > 1) {
    const auto f32 = q_in.options().dtype(at::kFloat);
    out_accum = at::empty({num_splits, s.batch, s.heads_q, s.len_q, D}, f32);
    lse_accum = at::empty({num_splits, s.batch, s.heads_q, s.len_q}, f32);
  }

  if (poison_outputs()) {
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    lse.fill_(std::numeric_limits<float>::quiet_NaN());
    if (num_splits > 1) {
      out_accum.fill_(std::numeric_limits<float>::quiet_NaN());
      lse_accum.fill_(std::numeric_limits<float>::quiet_NaN());
    }
  }

  FwdParams params;
  std::memset(&params, 0, sizeof(params));
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.q_stride = strides_of(q);
  params.k_stride = strides_of(k);
  params.v_stride = strides_of(v);
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.key_padding_mask = kpm.has_value() ? kpm->data_ptr<bool>() : nullptr;
  params.key_padding_mask_batch_stride = kpm.has_value() ? kpm->stride(0) : 0;
  params.seqlens_k = lens.has_value() ? lens->data_ptr<int32_t>() : nullptr;
  params.batch = static_cast<int>(s.batch);
  params.heads_q = static_cast<int>(s.heads_q);
  params.heads_kv = static_cast<int>(s.heads_kv);
  params.len_q = static_cast<int>(s.len_q);
  params.len_k = static_cast<int>(s.len_k);
  params.head_dim = static_cast<int>(D);
  params.group = static_cast<int>(s.heads_q / s.heads_kv);
  params.scale = static_cast<float>(scale);
  params.scale_log2 = static_cast<float>(scale * 1.4426950408889634074);  // scale * log2(e)
  params.is_causal = is_causal;
  params.use_sm90 = sm90 && num_splits == 1;
  params.sm90_tiles = sm90_tiles.tiles;
  params.num_sms = info.num_sms;
  params.num_splits = num_splits;
  if (num_splits > 1) {
    params.out_accum = out_accum.data_ptr<float>();
    params.lse_accum = lse_accum.data_ptr<float>();
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (dtype == at::kBFloat16) {
    dispatch_head_dim<__nv_bfloat16>(params, stream);
  } else {
    dispatch_head_dim<__half>(params, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace flash

TORCH_LIBRARY_IMPL(flash_attn, CUDA, m) { m.impl("fwd", &flash::fwd_cuda); }
