// Paged decode attention: the argument checks shared by its CPU, CUDA and Meta kernels (defined in attention.cpp).
//
// One query token per sequence attends to the first context_lens[b] tokens of its cache (everything cached so far,
// so causal), through its block table; kv_heads divides num_heads and query head h reads kv head
// h / (num_heads / kv_heads) (grouped-query attention). Layouts:
//   query                   [num_seqs, num_heads, head_dim]; any sequence and head strides, head_dim contiguous
//   key_cache, value_cache  [num_blocks, block_size, kv_heads, head_dim], contiguous, dtype of query
//   block_tables            int32 or int64 [num_seqs, max_blocks_per_seq], contiguous; entries past a sequence's
//                           ceil(context_lens[b] / block_size) blocks are never read (pad with -1 or anything)
//   context_lens            int32 or int64 [num_seqs], contiguous; 0 <= context_lens[b] <= max_blocks_per_seq *
//                           block_size; a sequence with 0 gets a zero output
//   out                     [num_seqs, num_heads, head_dim], contiguous, dtype of query

#pragma once

#include <ATen/core/Tensor.h>

namespace rlhf_engine {

// Metadata only (shapes, dtypes, strides, devices agree with each other): never reads tensor data.
void check_paged_attention_args(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens);

}  // namespace rlhf_engine
