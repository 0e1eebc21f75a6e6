// Host side of tma.cuh: tensor maps through the driver's cuTensorMapEncodeTiled, reached with the
// runtime's entry-point query (no link against libcuda).
#include <cudaTypedefs.h>

#include "tma.cuh"

namespace flash {

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                             cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

}  // namespace

bool make_tensor_map_4d(CUtensorMap* map, const void* base, bool bf16, int batch, int heads, int rows,
                        int head_dim, const Strides4& strides, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (encode == nullptr || rows <= 0 || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  constexpr uint64_t kElem = 2;
  // A dim of extent 1 is only ever read at coordinate 0: its stride does not matter, give it a valid one.
  auto stride_bytes = [](int64_t extent, int64_t stride) -> uint64_t {
    return extent == 1 ? 16u : static_cast<uint64_t>(stride) * kElem;
  };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t byte_strides[3] = {stride_bytes(rows, strides.row), stride_bytes(heads, strides.head),
                                      stride_bytes(batch, strides.batch)};
  for (const cuuint64_t s : byte_strides) {
    if (s == 0 || s % 16 != 0 || s >= (uint64_t(1) << 40)) return false;
  }
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult res =
      encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
             const_cast<void*>(base), dims, byte_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS;
}

}  // namespace flash
