// CUDA kernel of paged decode attention, behind a torch-free interface: raw pointers, sizes, the dtype enum of
// cache_kernels.h and a stream. The torch-facing wrapper (checks, current stream, device guard) lives in
// attention_cuda.cpp; the math and the layouts are those of ../attention.h.
//
// Layouts (element counts, not bytes):
//   query                   [num_seqs, num_heads, head_dim], strides q_seq_stride, q_head_stride; head_dim dense
//   key_cache, value_cache  [num_blocks, block_size, kv_heads, head_dim], contiguous, dtype of query
//   block_tables            int32 or int64 (tables64) [num_seqs, max_blocks], contiguous, on the device
//   context_lens            int32 or int64 (lens64) [num_seqs], on the device
//   out                     [num_seqs, num_heads, head_dim], contiguous, dtype of query

#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cache_kernels.h"

namespace rlhf_engine {
namespace cuda {

// Largest head_dim the kernel handles (8 elements per lane of a warp).
constexpr int64_t kPagedAttentionMaxHeadDim = 256;

// out[b, h] = softmax(scale * K_b q[b, h]) V_b over the first context_lens[b] tokens of sequence b, with kv head
// h / (num_heads / kv_heads); fp32 accumulation. The host does not read block_tables or context_lens (that would
// sync the stream), so the kernel stays in bounds on its own: a sequence whose context is negative or longer than
// max_blocks * block_size, or that reaches a block id outside [0, num_blocks), gets NaN; one with 0 tokens gets 0.
// Returns the launch error (cudaSuccess when fine); cudaErrorInvalidValue for a bad dtype, a head_dim above
// kPagedAttentionMaxHeadDim, kv_heads not dividing num_heads, or a negative size.
cudaError_t launch_paged_attention(const void* query, const void* key_cache, const void* value_cache, void* out,
                                   const void* block_tables, bool tables64, const void* context_lens, bool lens64,
                                   int64_t num_seqs, int64_t num_heads, int64_t kv_heads, int64_t head_dim,
                                   int64_t num_blocks, int64_t block_size, int64_t max_blocks, int64_t q_seq_stride,
                                   int64_t q_head_stride, float scale, int64_t sliding_window, float softcap,
                                   DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace rlhf_engine
