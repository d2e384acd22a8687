// CUDA kernel of paged decode attention (interface and layouts in attention_kernels.h). Plain CUDA, no torch
// headers, so it compiles with nvcc alone (tests/test_cuda_compile.py).
//
// One CUDA block per (sequence, query head), kWarps warps. Warp w takes the tokens t = w, w + kWarps, ...; its lanes
// split head_dim (lane holds elements lane, lane + 32, ...), so every K and V row is read with coalesced loads.
// Per token: the score by a warp reduction, then an online-softmax update of the warp's running max m, sum l and
// accumulator. The warps' partial results are merged through shared memory at the end. fp32 throughout.
//
// NOTE: a straightforward twin of the CPU kernel: correct for every supported shape and dtype and bandwidth-friendly,
// not tuned; on GPUs with flash-attn the rollout uses flash_attn_with_kvcache instead (ARCHITECTURE.md).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_kernels.h"

namespace rlhf_engine {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPerLane = static_cast<int>(kPagedAttentionMaxHeadDim / 32);  // head_dim elements per lane, at most

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

__device__ __forceinline__ int64_t read_index(const void* base, bool wide, int64_t i) {
  return wide ? static_cast<const int64_t*>(base)[i] : static_cast<int64_t>(static_cast<const int32_t*>(base)[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(const T* __restrict__ query,        // [num_seqs, num_heads, head_dim], strided
                           const T* __restrict__ key_cache,    // [num_blocks, block_size, kv_heads, head_dim]
                           const T* __restrict__ value_cache,  // [num_blocks, block_size, kv_heads, head_dim]
                           T* __restrict__ out,                // [num_seqs, num_heads, head_dim]
                           const void* __restrict__ block_tables, bool tables64,  // [num_seqs, max_blocks]
                           const void* __restrict__ context_lens, bool lens64,    // [num_seqs]
                           int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t num_blocks,
                           int64_t block_size, int64_t max_blocks, int64_t q_seq_stride, int64_t q_head_stride,
                           float scale,
                           int64_t sliding_window,  // > 0: only the last sliding_window tokens of the context
                           float softcap) {         // > 0: scores become softcap * tanh(score / softcap)
  const int64_t seq = blockIdx.x;  // int64 before any pointer arithmetic
  const int64_t head = blockIdx.y;
  const int64_t kv_head = head / (num_heads / kv_heads);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t ctx = read_index(context_lens, lens64, seq);
  bool bad = ctx < 0 || ctx > max_blocks * block_size;

  const T* q_row = query + seq * q_seq_stride + head * q_head_stride;
  float q[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    q[i] = d < head_dim ? to_float(q_row[d]) * scale : 0.f;
    acc[i] = 0.f;
  }
  float m = -INFINITY;  // running max of this warp's scores
  float l = 0.f;        // running sum of exp(score - m)
  const int64_t first = sliding_window > 0 && ctx > sliding_window ? ctx - sliding_window : 0;
  for (int64_t t = first + warp; !bad && t < ctx; t += kWarps) {
    const int64_t block = read_index(block_tables, tables64, seq * max_blocks + t / block_size);
    if (block < 0 || block >= num_blocks) {  // the same t for the whole warp: a warp-uniform exit
      bad = true;
      break;
    }
    const int64_t row = ((block * block_size + t % block_size) * kv_heads + kv_head) * head_dim;
    float partial = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < head_dim) partial += q[i] * to_float(key_cache[row + d]);
    }
    float score = warp_sum(partial);
    if (softcap > 0.f) score = softcap * tanhf(score / softcap);
    const float m_new = fmaxf(m, score);
    const float alpha = expf(m - m_new);  // 0 on the warp's first token, where m is -inf
    const float p = expf(score - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      acc[i] = acc[i] * alpha + (d < head_dim ? p * to_float(value_cache[row + d]) : 0.f);
    }
    m = m_new;
  }

  // Merge the warps: out = sum_w exp(m_w - M) acc_w / sum_w exp(m_w - M) l_w with M = max_w m_w.
  __shared__ float warp_m[kWarps];
  __shared__ float warp_l[kWarps];
  __shared__ float warp_acc[kWarps][kPagedAttentionMaxHeadDim];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) warp_acc[warp][lane + 32 * i] = acc[i];
  const bool any_bad = __syncthreads_or(bad) != 0;  // also the barrier before reading the shared arrays
  T* o = out + (seq * num_heads + head) * head_dim;
  float big_m = -INFINITY;
  for (int w = 0; w < kWarps; ++w) big_m = fmaxf(big_m, warp_m[w]);
  for (int64_t d = threadIdx.x; d < head_dim; d += kThreads) {
    float value;
    if (any_bad) {
      value = NAN;
    } else if (ctx == 0) {
      value = 0.f;
    } else {
      float num = 0.f, den = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        const float weight = warp_m[w] == -INFINITY ? 0.f : expf(warp_m[w] - big_m);  // a warp with no token
        num += weight * warp_acc[w][d];
        den += weight * warp_l[w];
      }
      value = num / den;
    }
    o[d] = from_float<T>(value);
  }
}

template <typename T>
void launch(const void* query, const void* key_cache, const void* value_cache, void* out, const void* block_tables,
            bool tables64, const void* context_lens, bool lens64, int64_t num_seqs, int64_t num_heads,
            int64_t kv_heads, int64_t head_dim, int64_t num_blocks, int64_t block_size, int64_t max_blocks,
            int64_t q_seq_stride, int64_t q_head_stride, float scale, int64_t sliding_window, float softcap,
            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(num_heads));
  paged_attention_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(query), static_cast<const T*>(key_cache), static_cast<const T*>(value_cache),
      static_cast<T*>(out), block_tables, tables64, context_lens, lens64, num_heads, kv_heads, head_dim, num_blocks,
      block_size, max_blocks, q_seq_stride, q_head_stride, scale, sliding_window, softcap);
}

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit
constexpr int64_t kMaxGridY = 65535;       // gridDim.y limit

}  // namespace

cudaError_t launch_paged_attention(const void* query, const void* key_cache, const void* value_cache, void* out,
                                   const void* block_tables, bool tables64, const void* context_lens, bool lens64,
                                   int64_t num_seqs, int64_t num_heads, int64_t kv_heads, int64_t head_dim,
                                   int64_t num_blocks, int64_t block_size, int64_t max_blocks, int64_t q_seq_stride,
                                   int64_t q_head_stride, float scale, int64_t sliding_window, float softcap,
                                   DType dtype, cudaStream_t stream) {
  if (num_seqs < 0 || num_heads < 0 || kv_heads <= 0 || head_dim < 0 || block_size <= 0 || max_blocks < 0 ||
      num_heads % kv_heads != 0 || head_dim > kPagedAttentionMaxHeadDim || num_seqs > kMaxGridX ||
      num_heads > kMaxGridY) {
    return cudaErrorInvalidValue;
  }
  if (num_seqs == 0 || num_heads == 0 || head_dim == 0) return cudaSuccess;  // a grid of 0 blocks is a launch error
  switch (dtype) {
    case DType::kFloat32:
      launch<float>(query, key_cache, value_cache, out, block_tables, tables64, context_lens, lens64, num_seqs,
                    num_heads, kv_heads, head_dim, num_blocks, block_size, max_blocks, q_seq_stride, q_head_stride,
                    scale, sliding_window, softcap, stream);
      break;
    case DType::kBFloat16:
      launch<__nv_bfloat16>(query, key_cache, value_cache, out, block_tables, tables64, context_lens, lens64,
                            num_seqs, num_heads, kv_heads, head_dim, num_blocks, block_size, max_blocks,
                            q_seq_stride, q_head_stride, scale, sliding_window, softcap, stream);
      break;
    case DType::kFloat16:
      launch<__half>(query, key_cache, value_cache, out, block_tables, tables64, context_lens, lens64, num_seqs,
                     num_heads, kv_heads, head_dim, num_blocks, block_size, max_blocks, q_seq_stride, q_head_stride,
                     scale, sliding_window, softcap, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_engine
