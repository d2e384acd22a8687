// CPU kernels of the paged KV-cache ops (schemas in bindings.cpp), the Meta kernels used by FakeTensor /
// torch.compile, and the argument checks every backend shares (cache_ops.h).

#include "cache_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <unordered_set>

namespace rlhf_engine {

void check_kv_dtype(const char* op, const char* arg, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", arg,
              " must be float32, bfloat16 or float16, found ", dtype);
}

void check_cache_pair(const char* op, const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK(key_cache.dim() == 4, op, ": key_cache must be [num_blocks, block_size, kv_heads, head_dim], found ",
              key_cache.dim(), " dims ", key_cache.sizes());
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache must have the shape of key_cache ",
              key_cache.sizes(), ", found ", value_cache.sizes());
  check_kv_dtype(op, "key_cache", key_cache);
  TORCH_CHECK(value_cache.scalar_type() == key_cache.scalar_type(), op, ": value_cache dtype ",
              value_cache.scalar_type(), " differs from key_cache dtype ", key_cache.scalar_type());
  TORCH_CHECK(value_cache.device() == key_cache.device(), op, ": value_cache is on ", value_cache.device(),
              " but key_cache is on ", key_cache.device());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), op,
              ": key_cache and value_cache must be contiguous (the kernels address them by block); allocate them with "
              "torch.empty(num_blocks, block_size, kv_heads, head_dim)");
}

void check_write_kv_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "write_kv";
  check_cache_pair(op, key_cache, value_cache);
  TORCH_CHECK(key.dim() == 3, op, ": key must be [num_tokens, kv_heads, head_dim], found ", key.dim(), " dims ",
              key.sizes());
  TORCH_CHECK(key.size(1) == key_cache.size(2) && key.size(2) == key_cache.size(3), op, ": key ", key.sizes(),
              " does not match key_cache ", key_cache.sizes(), " in (kv_heads, head_dim)");
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value must have the shape of key ", key.sizes(), ", found ",
              value.sizes());
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type(), op,
              ": key ", key.scalar_type(), " and value ", value.scalar_type(), " must have the cache dtype ",
              key_cache.scalar_type());
  TORCH_CHECK(key.device() == key_cache.device() && value.device() == key_cache.device(), op, ": key (",
              key.device(), ") and value (", value.device(), ") must be on the cache device ", key_cache.device());
  // A token stride is allowed (key may be a slice of a fused qkv projection); each token's row must be dense.
  const int64_t head_dim = key.size(2);
  for (const auto* t : {&key, &value}) {
    TORCH_CHECK((t->size(2) <= 1 || t->stride(2) == 1) && (t->size(1) <= 1 || t->stride(1) == head_dim), op,
                ": key and value must be contiguous in (kv_heads, head_dim), found strides ", t->strides(),
                "; call .contiguous()");
  }
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), op,
              ": slot_mapping must be [num_tokens] = [", key.size(0), "], found ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, found ",
              slot_mapping.scalar_type());
  TORCH_CHECK(slot_mapping.is_contiguous(), op, ": slot_mapping must be contiguous");
  TORCH_CHECK(slot_mapping.device() == key_cache.device(), op, ": slot_mapping is on ", slot_mapping.device(),
              " but the caches are on ", key_cache.device());
}

void check_copy_blocks_args(const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_mapping) {
  constexpr const char* op = "copy_blocks";
  check_cache_pair(op, key_cache, value_cache);
  TORCH_CHECK(block_mapping.dim() == 2 && block_mapping.size(1) == 2, op,
              ": block_mapping must be [num_pairs, 2] of (src, dst), found ", block_mapping.sizes());
  TORCH_CHECK(block_mapping.scalar_type() == at::kLong, op, ": block_mapping must be int64, found ",
              block_mapping.scalar_type());
  TORCH_CHECK(block_mapping.is_contiguous(), op, ": block_mapping must be contiguous");
}

void check_block_mapping_values(const at::Tensor& block_mapping, int64_t num_blocks) {
  constexpr const char* op = "copy_blocks";
  TORCH_CHECK(block_mapping.device().is_cpu(), op, ": block_mapping must stay on the CPU (it is read on the host), ",
              "found ", block_mapping.device());
  const int64_t* pairs = block_mapping.data_ptr<int64_t>();  // [num_pairs, 2] of (src, dst)
  const int64_t num_pairs = block_mapping.size(0);
  std::unordered_set<int64_t> dsts;
  dsts.reserve(num_pairs);
  for (int64_t i = 0; i < num_pairs; ++i) {
    const int64_t src = pairs[2 * i];
    const int64_t dst = pairs[2 * i + 1];
    TORCH_CHECK(src >= 0 && src < num_blocks && dst >= 0 && dst < num_blocks, op, ": block_mapping[", i, "] = (",
                src, ", ", dst, ") out of range [0, ", num_blocks, ") (num_blocks)");
    TORCH_CHECK(dsts.insert(dst).second, op, ": block ", dst, " is a destination twice in block_mapping");
  }
  for (int64_t i = 0; i < num_pairs; ++i) {
    TORCH_CHECK(dsts.count(pairs[2 * i]) == 0, op, ": block ", pairs[2 * i],
                " is both a source and a destination in block_mapping; the copies must be independent");
  }
}

namespace {

// Elements copied per parallel task at least (the value of at::internal::GRAIN_SIZE).
constexpr int64_t kGrainElems = 32768;

void write_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                  const at::Tensor& slot_mapping) {
  check_write_kv_args(key, value, key_cache, value_cache, slot_mapping);
  TORCH_CHECK(key_cache.device().is_cpu(), "write_kv: the CPU kernel got tensors on ", key_cache.device());
  const int64_t num_tokens = key.size(0);
  const int64_t row = key.size(1) * key.size(2);  // elements per token: kv_heads * head_dim
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t key_stride = key.stride(0);
  const int64_t value_stride = value.stride(0);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();  // [num_tokens]
  // Every slot is checked before the first write, so a bad slot leaves the caches untouched.
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "write_kv: slot_mapping[", t, "] = ", slots[t],
                " out of range [-1, ", num_slots, ") (num_blocks * block_size; -1 = padding)");
  }
  // NOTE: one token is a small copy; batch enough of them per task to amortise the thread hand-off.
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "write_kv_cpu", [&] {
    const scalar_t* k = key.const_data_ptr<scalar_t>();    // [num_tokens, kv_heads, head_dim], token stride key_stride
    const scalar_t* v = value.const_data_ptr<scalar_t>();  // [num_tokens, kv_heads, head_dim], token stride value_stride
    scalar_t* kc = key_cache.mutable_data_ptr<scalar_t>();    // [num_blocks * block_size, kv_heads, head_dim]
    scalar_t* vc = value_cache.mutable_data_ptr<scalar_t>();  // [num_blocks * block_size, kv_heads, head_dim]
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t slot = slots[t];
        if (slot < 0) continue;  // padding
        std::copy_n(k + t * key_stride, row, kc + slot * row);
        std::copy_n(v + t * value_stride, row, vc + slot * row);
      }
    });
  });
}

void copy_blocks_cpu(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& block_mapping) {
  check_copy_blocks_args(key_cache, value_cache, block_mapping);
  TORCH_CHECK(key_cache.device().is_cpu(), "copy_blocks: the CPU kernel got caches on ", key_cache.device());
  check_block_mapping_values(block_mapping, key_cache.size(0));
  const int64_t num_pairs = block_mapping.size(0);
  const int64_t block_elems = key_cache.stride(0);  // block_size * kv_heads * head_dim
  const int64_t* pairs = block_mapping.const_data_ptr<int64_t>();  // [num_pairs, 2] of (src, dst)
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(block_elems, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key_cache.scalar_type(), "copy_blocks_cpu", [&] {
    scalar_t* kc = key_cache.mutable_data_ptr<scalar_t>();    // [num_blocks, block_size, kv_heads, head_dim]
    scalar_t* vc = value_cache.mutable_data_ptr<scalar_t>();  // [num_blocks, block_size, kv_heads, head_dim]
    // Task i copies pair i / 2 in the key cache (i even) or the value cache (i odd).
    at::parallel_for(0, 2 * num_pairs, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* cache = (i % 2 == 0) ? kc : vc;
        const int64_t src = pairs[2 * (i / 2)];
        const int64_t dst = pairs[2 * (i / 2) + 1];
        std::copy_n(cache + src * block_elems, block_elems, cache + dst * block_elems);
      }
    });
  });
}

// Meta kernels: FakeTensor and torch.compile trace the ops through these; metadata checks only, nothing to write.
void write_kv_meta(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                   const at::Tensor& slot_mapping) {
  check_write_kv_args(key, value, key_cache, value_cache, slot_mapping);
}

void copy_blocks_meta(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& block_mapping) {
  check_copy_blocks_args(key_cache, value_cache, block_mapping);
}

}  // namespace
}  // namespace rlhf_engine

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("write_kv", &rlhf_engine::write_kv_cpu);
  m.impl("copy_blocks", &rlhf_engine::copy_blocks_cpu);
}

TORCH_LIBRARY_IMPL(rlhf_engine, Meta, m) {
  m.impl("write_kv", &rlhf_engine::write_kv_meta);
  m.impl("copy_blocks", &rlhf_engine::copy_blocks_meta);
}
