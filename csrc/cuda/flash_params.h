// Parameters of one flash attention call, filled by the API layer (flash_api_cuda.cpp) and read by
// the kernels. Plain data: no torch headers, so the kernels compile with nvcc alone.
#pragma once

#include <cstdint>

namespace flash {

// Element strides of a (B, H, N, D) tensor; the last dim is contiguous (stride 1).
struct Strides4 {
  int64_t batch;
  int64_t head;
  int64_t row;
};

// The tiles of the wgmma forward (FwdSm90Config<D> in kernel_traits.h): the head dim's default, its 64-row
// small-grid tiles, or its long-key tiles.
enum class Sm90Tiles : int8_t { kDefault, kSmallGrid, kLongKeys };

struct FwdParams {
  // Inputs: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D); element type fixed by the template.
  const void* q;
  const void* k;
  const void* v;
  Strides4 q_stride, k_stride, v_stride;
  // Output (B, Hq, Nq, D) contiguous, same element type; lse (B, Hq, Nq) float32 contiguous.
  void* out;
  float* lse;
  // Optional masks: key_padding_mask (B, Nk) bool (True = ignore), row stride in elements;
  // seqlens_k (B,) int32. nullptr when absent.
  const bool* key_padding_mask;
  int64_t key_padding_mask_batch_stride;
  const int32_t* seqlens_k;

  int batch, heads_q, heads_kv, len_q, len_k, head_dim;
  int group;    // heads_q / heads_kv
  float scale;  // softmax scale
  float scale_log2;  // scale * log2(e)
  bool is_causal;
  bool use_sm90;  // the one-pass forward runs the wgmma kernel (run_fwd_sm90); BwdParams: run_bwd_sm90
  Sm90Tiles sm90_tiles;  // ... with which of FwdSm90Config<D>'s tiles (the API layer's choose_sm90_tiles)

  // Split-KV path (flash_fwd_split_kernel.cuh), used when num_splits >= 2: the keys are cut into
  // num_splits ranges of whole tiles; split s writes the partial output of row (b, h, i) to
  // out_accum (num_splits, B, Hq, Nq, D) and its partial lse (natural log, -inf when the split saw
  // no key) to lse_accum (num_splits, B, Hq, Nq), both float32 contiguous scratch of the API layer;
  // the merge kernel writes out and lse. num_splits = 1: the one-pass kernel, accum pointers unused.
  int num_splits;
  int num_sms;  // SMs of the device (the API layer's cached count): the grid of persistent one-pass tiles
  float* out_accum;
  float* lse_accum;
};

// dq_accum's rows are Nq rounded up to this (a multiple of every backward query tile).
constexpr int kDqAccumRowMultiple = 128;

struct BwdParams : FwdParams {
  // dout (B, Hq, Nq, D) any strides with a contiguous last dim; out and lse as saved by the forward.
  const void* dout;
  Strides4 dout_stride;
  const void* out_saved;
  Strides4 out_stride;
  const float* lse_saved;
  // Outputs. dq (B, Hq, Nq, D) contiguous in the input type; dk, dv (B, Hq, Nk, D) contiguous
  // (one slice per query head: the API layer sums the group for GQA).
  void* dq;
  void* dk;
  void* dv;
  // Scratch the API layer allocates: dq_accum (B, Hq, dq_accum_rows, D) float32 zeroed, its rows
  // Nq rounded up to kDqAccumRowMultiple so that whole query tiles add into it without row guards;
  // softmax_d (B, Hq, Nq) float32 (rowsum(dout * out)).
  float* dq_accum;
  int dq_accum_rows;
  float* softmax_d;
  // Opt-in shared memory per block of the device, in bytes: run_bwd launches the default tiles of
  // the head dim when they fit, else the fallback (flash_bwd_traits.h, BwdChoice).
  int max_smem_per_block;
};

}  // namespace flash
