// CUDA kernels of the paged KV-cache ops (interface and layouts in cache_kernels.h). Plain CUDA, no torch
// headers, so it compiles with nvcc alone (tests/test_cuda_compile.py).
//
// NOTE: both ops are bit-exact moves, so the kernels do not care about the element type: they move the widest word
// (16, 8, 4 or 2 bytes) that divides every row size, stride and base address, which gives 16-byte loads and stores
// for the usual head_dim of 64 or 128 whatever the dtype. The dtype only converts element counts to bytes.

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "cache_kernels.h"

namespace rlhf_engine {
namespace cuda {
namespace {

// One CUDA block per token: its threads stride over the token's row of row_words words.
template <typename Word>
__global__ void write_kv_kernel(const Word* __restrict__ key,    // [num_tokens, row_words], token stride key_stride
                                const Word* __restrict__ value,  // [num_tokens, row_words], token stride value_stride
                                Word* __restrict__ key_cache,    // [num_blocks * block_size, row_words]
                                Word* __restrict__ value_cache,  // [num_blocks * block_size, row_words]
                                const int64_t* __restrict__ slot_mapping,  // [num_tokens]
                                int64_t row_words, int64_t key_stride, int64_t value_stride, int64_t num_slots) {
  const int64_t token = blockIdx.x;  // int64 before any pointer arithmetic
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // -1 = padding; out of range: never write outside the cache
  const Word* k = key + token * key_stride;
  const Word* v = value + token * value_stride;
  Word* kc = key_cache + slot * row_words;
  Word* vc = value_cache + slot * row_words;
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
    kc[i] = k[i];
    vc[i] = v[i];
  }
}

// One CUDA block per (pair, cache): blockIdx.x = pair, blockIdx.y = 0 for the key cache, 1 for the value cache.
template <typename Word>
__global__ void copy_blocks_kernel(Word* __restrict__ key_cache,    // [num_blocks, block_words]
                                   Word* __restrict__ value_cache,  // [num_blocks, block_words]
                                   const int64_t* __restrict__ block_mapping,  // [num_pairs, 2] of (src, dst)
                                   int64_t block_words, int64_t num_blocks) {
  const int64_t pair = blockIdx.x;
  const int64_t src = block_mapping[2 * pair];
  const int64_t dst = block_mapping[2 * pair + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  Word* cache = blockIdx.y == 0 ? key_cache : value_cache;
  const Word* from = cache + src * block_words;
  Word* to = cache + dst * block_words;
  for (int64_t i = threadIdx.x; i < block_words; i += blockDim.x) to[i] = from[i];
}

// Largest word (16, 8, 4, 2 or 1 bytes) dividing every value: the low bits of their OR are the bits any of them has.
int word_bytes(std::initializer_list<uint64_t> values) {
  uint64_t bits = 0;
  for (uint64_t v : values) bits |= v;
  for (int w = 16; w > 1; w /= 2) {
    if (bits % w == 0) return w;
  }
  return 1;
}

template <typename T>
struct WordTag {
  using type = T;
};

// Calls fn(WordTag<W>{}) with the unsigned type W of `bytes` bytes (uint4 for 16).
template <typename Fn>
void with_word(int bytes, Fn&& fn) {
  switch (bytes) {
    case 16: fn(WordTag<uint4>{}); break;
    case 8: fn(WordTag<uint2>{}); break;
    case 4: fn(WordTag<uint32_t>{}); break;
    case 2: fn(WordTag<uint16_t>{}); break;
    default: fn(WordTag<uint8_t>{}); break;
  }
}

// Threads per CUDA block: a multiple of the warp size covering the words, at most 512.
unsigned threads_for(int64_t words) {
  const int64_t rounded = (words + 31) / 32 * 32;
  return static_cast<unsigned>(rounded < 32 ? 32 : (rounded > 512 ? 512 : rounded));
}

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit

}  // namespace

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kBFloat16: return 2;
    case DType::kFloat16: return 2;
  }
  return 0;
}

cudaError_t launch_write_kv(const void* key, const void* value, void* key_cache, void* value_cache,
                            const int64_t* slot_mapping, int64_t num_tokens, int64_t row_elems, int64_t key_stride,
                            int64_t value_stride, int64_t num_slots, DType dtype, cudaStream_t stream) {
  const int64_t elem = dtype_size(dtype);
  if (elem == 0 || num_tokens < 0 || row_elems < 0 || num_tokens > kMaxGridX) return cudaErrorInvalidValue;
  if (num_tokens == 0 || row_elems == 0) return cudaSuccess;  // a grid of 0 blocks is a launch error
  const int w = word_bytes({static_cast<uint64_t>(row_elems * elem), static_cast<uint64_t>(key_stride * elem),
                            static_cast<uint64_t>(value_stride * elem), reinterpret_cast<uintptr_t>(key),
                            reinterpret_cast<uintptr_t>(value), reinterpret_cast<uintptr_t>(key_cache),
                            reinterpret_cast<uintptr_t>(value_cache)});
  const int64_t row_words = row_elems * elem / w;
  with_word(w, [&](auto tag) {
    using Word = typename decltype(tag)::type;
    write_kv_kernel<Word><<<static_cast<unsigned>(num_tokens), threads_for(row_words), 0, stream>>>(
        static_cast<const Word*>(key), static_cast<const Word*>(value), static_cast<Word*>(key_cache),
        static_cast<Word*>(value_cache), slot_mapping, row_words, key_stride * elem / w, value_stride * elem / w,
        num_slots);
  });
  return cudaGetLastError();
}

cudaError_t launch_copy_blocks(void* key_cache, void* value_cache, const int64_t* block_mapping, int64_t num_pairs,
                               int64_t block_elems, int64_t num_blocks, DType dtype, cudaStream_t stream) {
  const int64_t elem = dtype_size(dtype);
  if (elem == 0 || num_pairs < 0 || block_elems < 0 || num_pairs > kMaxGridX) return cudaErrorInvalidValue;
  if (num_pairs == 0 || block_elems == 0) return cudaSuccess;
  const int w = word_bytes({static_cast<uint64_t>(block_elems * elem), reinterpret_cast<uintptr_t>(key_cache),
                            reinterpret_cast<uintptr_t>(value_cache)});
  const int64_t block_words = block_elems * elem / w;
  with_word(w, [&](auto tag) {
    using Word = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(num_pairs), 2);
    copy_blocks_kernel<Word><<<grid, threads_for(block_words), 0, stream>>>(
        static_cast<Word*>(key_cache), static_cast<Word*>(value_cache), block_mapping, block_words, num_blocks);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_engine
