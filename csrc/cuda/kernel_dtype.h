// The torch dtype -> kernel dtype mapping shared by the CUDA wrappers (cache_ops_cuda.cpp, attention_cuda.cpp).
// A torch header, so it is for the .cpp wrappers only, never for a .cu file.

#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cache_kernels.h"

namespace rlhf_engine {

// The kernels' DType of a cache dtype; raises, naming op, for anything but float32, bfloat16 and float16.
inline cuda::DType to_kernel_dtype(const char* op, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": unsupported cache dtype ", dtype, " (float32, bfloat16 or float16)");
}

}  // namespace rlhf_engine
