// CUDA implementation of paged_attention (schema in bindings.cpp): checks, device guard and current stream around
// the torch-free launcher of attention_kernels.cu. Compiled only on CUDA builds (setup.py).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention.h"
#include "attention_kernels.h"
#include "kernel_dtype.h"

namespace rlhf_engine {
namespace {

at::Tensor paged_attention_cuda(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                int64_t sliding_window, double softcap) {
  check_paged_attention_args(query, key_cache, value_cache, block_tables, context_lens);
  TORCH_CHECK_VALUE(sliding_window >= 0, "paged_attention: sliding_window must be >= 0 (0: none), found ",
                    sliding_window);
  TORCH_CHECK_VALUE(softcap >= 0, "paged_attention: softcap must be >= 0 (0: none), found ", softcap);
  TORCH_CHECK(query.is_cuda(), "paged_attention: the CUDA kernel got tensors on ", query.device());
  TORCH_CHECK(query.size(2) <= cuda::kPagedAttentionMaxHeadDim, "paged_attention: head_dim ", query.size(2),
              " is above the CUDA kernel's limit of ", cuda::kPagedAttentionMaxHeadDim);
  // NOTE: block ids and context lengths are not range-checked here: that would read them back and sync the stream
  // on every decode step. The kernel stays in bounds and gives NaN for a sequence with a bad id or length instead.
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.device().index());
  at::Tensor out = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  C10_CUDA_CHECK(cuda::launch_paged_attention(
      query.const_data_ptr(), key_cache.const_data_ptr(), value_cache.const_data_ptr(), out.mutable_data_ptr(),
      block_tables.const_data_ptr(), block_tables.scalar_type() == at::kLong, context_lens.const_data_ptr(),
      context_lens.scalar_type() == at::kLong, query.size(0), query.size(1), key_cache.size(2), query.size(2),
      key_cache.size(0), key_cache.size(1), block_tables.size(1), query.stride(0), query.stride(1),
      static_cast<float>(scale), sliding_window, static_cast<float>(softcap),
      to_kernel_dtype("paged_attention", query.scalar_type()), stream));
  return out;
}

}  // namespace
}  // namespace rlhf_engine

TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m) { m.impl("paged_attention", &rlhf_engine::paged_attention_cuda); }
