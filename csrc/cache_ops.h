// Argument checks shared by the CPU, CUDA and Meta implementations of the cache ops (defined in cache_ops.cpp);
// paged attention (attention.cpp) uses the cache checks too.
//
// Layouts:
//   key, value         [num_tokens, kv_heads, head_dim]   any token stride; (kv_heads, head_dim) contiguous
//   key_cache, value_cache [num_blocks, block_size, kv_heads, head_dim]   contiguous
//   slot_mapping       int64 [num_tokens]; slot = block_id * block_size + offset, -1 = padding (skipped)
//   block_mapping      int64 [num_pairs, 2] of (src, dst) block ids, on the host

#pragma once

#include <ATen/core/Tensor.h>

namespace rlhf_engine {

// dtype is float32, bfloat16 or float16.
void check_kv_dtype(const char* op, const char* arg, const at::Tensor& t);
// Both caches [num_blocks, block_size, kv_heads, head_dim], same shape, dtype and device, contiguous.
void check_cache_pair(const char* op, const at::Tensor& key_cache, const at::Tensor& value_cache);

// Metadata only (shapes, dtypes, strides, devices agree with each other): never reads tensor data.
void check_write_kv_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& slot_mapping);
void check_copy_blocks_args(const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_mapping);

// Reads block_mapping (it must be on the CPU): ids in [0, num_blocks), no destination twice, no destination that
// is also a source, so the copies are independent of each other and may run in any order.
void check_block_mapping_values(const at::Tensor& block_mapping, int64_t num_blocks);

}  // namespace rlhf_engine
