// CUDA implementations of the cache ops (schemas in bindings.cpp): checks, device guard and current stream around
// the torch-free launchers of cache_kernels.cu. Compiled only on CUDA builds (setup.py).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cache_kernels.h"
#include "cache_ops.h"
#include "kernel_dtype.h"

namespace rlhf_engine {
namespace {

void write_kv_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                   const at::Tensor& slot_mapping) {
  check_write_kv_args(key, value, key_cache, value_cache, slot_mapping);
  TORCH_CHECK(key_cache.is_cuda(), "write_kv: the CUDA kernel got tensors on ", key_cache.device());
  // NOTE: slot values are not range-checked here: that would read slot_mapping back and sync the stream on every
  // decode step. The kernel skips slots outside [0, num_blocks * block_size) instead of writing out of bounds.
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(key_cache.device().index());
  C10_CUDA_CHECK(cuda::launch_write_kv(
      key.const_data_ptr(), value.const_data_ptr(), key_cache.mutable_data_ptr(), value_cache.mutable_data_ptr(),
      slot_mapping.const_data_ptr<int64_t>(), key.size(0), key.size(1) * key.size(2), key.stride(0),
      value.stride(0), key_cache.size(0) * key_cache.size(1), to_kernel_dtype("write_kv", key.scalar_type()),
      stream));
}

void copy_blocks_cuda(at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& block_mapping) {
  check_copy_blocks_args(key_cache, value_cache, block_mapping);
  TORCH_CHECK(key_cache.is_cuda(), "copy_blocks: the CUDA kernel got caches on ", key_cache.device());
  // block_mapping stays on the host (as in vLLM): the ids are validated there without a sync, then copied over.
  check_block_mapping_values(block_mapping, key_cache.size(0));
  if (block_mapping.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(key_cache.device().index());
  // The copy is enqueued on the current stream, so the kernel below sees it; dropping `mapping` right after the
  // launch is safe because the caching allocator only hands its memory to later work on the same stream.
  const at::Tensor mapping = block_mapping.to(key_cache.device(), /*non_blocking=*/true);
  C10_CUDA_CHECK(cuda::launch_copy_blocks(key_cache.mutable_data_ptr(), value_cache.mutable_data_ptr(),
                                          mapping.const_data_ptr<int64_t>(), block_mapping.size(0),
                                          key_cache.stride(0), key_cache.size(0),
                                          to_kernel_dtype("copy_blocks", key_cache.scalar_type()), stream));
}

}  // namespace
}  // namespace rlhf_engine

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) {
  m.impl("write_kv", &rlhf_engine::write_kv_cuda);
  m.impl("copy_blocks", &rlhf_engine::copy_blocks_cuda);
}
