// Vectorised math shared by the CPU kernels (GCC/Clang vector extensions; each kernel picks its own width).
#pragma once

#include <ATen/Version.h>

#include <cstdint>
#include <cstring>
#include <string>

// Every vector helper of the kernels is RLHF_INLINE: no 32-byte vector crosses a call, so the ABI warning GCC
// gives for returning one on a baseline (non-AVX) target does not apply.
#define RLHF_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rlhf_engine {
namespace simd {

#if defined(__x86_64__)
// Whether the kernels compiled twice (baseline and target("avx2,fma,...")) run their AVX2 copy: the CPU has AVX2,
// FMA and F16C, and torch's CPU capability allows it (ATEN_CPU_CAPABILITY=default forces the baseline copy).
inline bool use_avx2() {
  static const bool yes = [] {
    const std::string capability = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    return (capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}
#endif

// exp(x) by Cody-Waite range reduction and the Cephes polynomial, about 1 ulp. VF is a float vector type and VI
// the int32 vector of the same width. n = round(x / ln 2) is computed as trunc(x / ln 2 + Bias + 0.5) - Bias,
// which is a floor of a positive number only while x / ln 2 > -Bias: callers clamp x to their range first
// (|x| <= 20 with Bias 64 in the PPO loss; -87 <= x <= 0 with Bias 128 in the softmax of paged attention).
template <typename VF, typename VI, int Bias>
RLHF_INLINE VF exp_cephes(const VF& x) {
  const VI ni = __builtin_convertvector(x * 1.44269504088896341f + (Bias + 0.5f), VI) - Bias;
  const VF n = __builtin_convertvector(ni, VF);
  const VF r = x - n * 0.693359375f + n * 2.12194440e-4f;
  VF p = r * 0.f + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const VF y = p * r * r + r + 1.0f;
  const VI bits = (ni + 127) << 23;  // 2^n
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

}  // namespace simd
}  // namespace rlhf_engine
