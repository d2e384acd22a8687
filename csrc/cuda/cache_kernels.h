// CUDA kernels of the paged KV-cache ops, behind a torch-free interface: raw pointers, sizes, a dtype enum and a
// stream. The torch-facing wrappers (checks, current stream, device guard) live in cache_ops_cuda.cpp.
//
// Layouts (element counts, not bytes):
//   key, value              [num_tokens, kv_heads, head_dim], token stride key_stride / value_stride, rows dense
//   key_cache, value_cache  [num_blocks, block_size, kv_heads, head_dim], contiguous
//   slot_mapping            int64 [num_tokens] on the device; -1 = padding, skipped
//   block_mapping           int64 [num_pairs, 2] of (src, dst) on the device

#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_engine {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Bytes per element of dtype; 0 for a value outside the enum.
int64_t dtype_size(DType dtype);

// Copies the row (kv_heads * head_dim = row_elems elements) of every token t with slot_mapping[t] >= 0 into row
// slot_mapping[t] of both caches. Slots >= num_slots (num_blocks * block_size) are skipped, never written: the
// host does not read slot_mapping, so the kernel must stay in bounds on its own.
// Returns the launch error (cudaSuccess when fine); cudaErrorInvalidValue for a bad dtype or negative size.
cudaError_t launch_write_kv(const void* key, const void* value, void* key_cache, void* value_cache,
                            const int64_t* slot_mapping, int64_t num_tokens, int64_t row_elems, int64_t key_stride,
                            int64_t value_stride, int64_t num_slots, DType dtype, cudaStream_t stream);

// For every pair (src, dst), copies block src onto block dst in both caches; block_elems = block_size * kv_heads *
// head_dim. Pairs with an id outside [0, num_blocks) are skipped (the wrapper validated them on the host).
cudaError_t launch_copy_blocks(void* key_cache, void* value_cache, const int64_t* block_mapping, int64_t num_pairs,
                               int64_t block_elems, int64_t num_blocks, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlhf_engine
