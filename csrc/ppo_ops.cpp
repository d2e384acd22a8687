// CPU kernels of the PPO objective (schemas in bindings.cpp): the fused policy loss (ppo, gspo, cispo, sapo) +
// KL term, and the GAE scan. The CUDA path of these ops is Triton (kernels/ppo_loss.py, kernels/gae.py); these are the native
// CPU twins, one pass over the data with no temporaries, parallel over rows.
//
// Layouts: every per-token tensor is [R, T], contiguous; logp/old_logp/advantages/ref_logp/rewards/values are
// float32 (the Python wrapper converts), mask is float32 or bool; is_weights (rollout correction) float32. Math as in kernels/ppo_loss.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "simd.h"

namespace rlhf_engine {
namespace {

constexpr int64_t kNumPartials = 7;  // S, M, clipped, approx_kl, ratio_sum, ratio_max, kl_sum
enum KlKind : int { kNoRef = -1, kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

// NOTE: explicit SIMD through GCC/Clang vector extensions, 8 floats wide: with the default -ftrapping-math the
// compiler will not if-convert the many selects of this loop, so an auto-vectorised version never materialises;
// written this way the loop body is branch-free by construction. As in attention.cpp, the build targets the x86-64
// baseline (an 8-float vector is a pair of SSE registers) and the row loop is compiled a second time under
// target("avx2,fma") (one YMM register), which runs when the CPU and torch's capability allow (simd::use_avx2;
// ATEN_CPU_CAPABILITY=default forces the baseline copy, which is how a test reaches it). Every helper is
// always_inline so that each copy is compiled for its own target.

constexpr int64_t W = 8;
typedef float vf __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(32), aligned(4), may_alias));  // a vf at any float address
typedef int32_t vi __attribute__((vector_size(32)));

RLHF_INLINE vf splat(float x) { return vf{} + x; }
RLHF_INLINE vf select(vi cond, vf a, vf b) { return cond ? a : b; }
RLHF_INLINE vf vclamp(vf x, float lo, float hi) {
  x = x < lo ? splat(lo) : x;
  return x > hi ? splat(hi) : x;
}

// exp(x) for x in [-20, 20] (every caller clamps first), and for x in [-87, 0].
RLHF_INLINE vf vexp(vf x) { return simd::exp_cephes<vf, vi, 64>(x); }
RLHF_INLINE vf vexp_neg(vf x) { return simd::exp_cephes<vf, vi, 128>(x); }

// Loads n <= W elements as floats, zero beyond n.
template <typename T>
RLHF_INLINE vf load(const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == W) return *reinterpret_cast<const vf_u*>(src);
  }
  vf v = splat(0.f);
  for (int64_t k = 0; k < n; ++k) v[k] = static_cast<float>(src[k]);
  return v;
}

RLHF_INLINE void store(float* dst, vf v, int64_t n) {
  if (n == W) {
    *reinterpret_cast<vf_u*>(dst) = v;
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = v[k];
  }
}

RLHF_INLINE float hsum(vf v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }
RLHF_INLINE float hmax(vf v) {
  float m = v[0];
  for (int k = 1; k < W; ++k) m = std::max(m, v[k]);
  return m;
}

// KL estimate and its derivative w.r.t. logp (ARCHITECTURE.md); KIND is a compile-time constant.
template <int KIND>
RLHF_INLINE void kl_and_grad(vf logp, vf ref, vf& kl, vf& dkl) {
  const vf diff = logp - ref;
  if constexpr (KIND == kK1) {
    kl = diff;
    dkl = splat(1.f);
  } else if constexpr (KIND == kAbs) {
    kl = diff < 0.f ? -diff : diff;
    dkl = diff > 0.f ? splat(1.f) : (diff < 0.f ? splat(-1.f) : splat(0.f));
  } else if constexpr (KIND == kK2) {
    kl = 0.5f * diff * diff;
    dkl = diff;
  } else {  // k3: exp(d) - d - 1, d = ref - logp clamped to [-20, 20], the result clamped to [-10, 10]
    const vf d_raw = -diff;
    const vf d = vclamp(d_raw, -20.f, 20.f);
    const vf e = vexp(d);
    const vf raw = e - d - 1.f;
    kl = vclamp(raw, -10.f, 10.f);
    const vi live = (d_raw >= -20.f) & (d_raw <= 20.f) & (raw >= -10.f) & (raw <= 10.f);
    dkl = select(live, 1.f - e, splat(0.f));
  }
}

enum PolicyKind : int { kPPO = 0, kGSPO = 1, kCISPO = 2, kSAPO = 3 };  // rlhf_engine.ops.ppo.POLICY_LOSSES

struct PolicyParams {
  float ratio_low, ratio_high, dual_clip, kl_coef, tau_pos, tau_neg;
  bool dual;  // dual_clip > 0 (ppo only)
};

// The policy term P, its derivative w.r.t. logp, the clipped flag and the ratio of one vector of tokens
// (kernels/ppo_loss.py: _policy_term). seq_ratio / seq_live: GSPO's row ratio and whether its log is below 10.
template <int POLICY>
RLHF_INLINE void policy_term(vf lp, vf old, vf a, float seq_ratio, bool seq_live, const PolicyParams& p, vf& term,
                        vf& dterm, vi& clipped, vf& ratio) {
  const vf zero = splat(0.f);
  const vf diff = lp - old;
  vi in_range = (diff >= -20.f) & (diff <= 20.f);
  ratio = vexp(vclamp(diff, -20.f, 20.f));
  if constexpr (POLICY == kGSPO) {
    ratio = splat(seq_ratio);
    in_range = seq_live ? (zero == zero) : (zero != zero);
  }
  if constexpr (POLICY == kSAPO) {
    // sigmoid(x) and its derivative e / (1 + e)^2 from e = exp(-|x|): no overflow, the tails kept
    const vi positive = a > 0.f;
    const vf x = select(positive, splat(p.tau_pos), splat(p.tau_neg)) * (ratio - 1.f);
    const vf ax = select(x < 0.f, -x, x);
    const vf e = vexp_neg(-select(ax > 87.f, splat(87.f), ax));
    const vf inv = 1.f / (1.f + e);
    const vf gate = select(x >= 0.f, inv, e * inv);
    term = -a * gate * select(positive, splat(4.f / p.tau_pos), splat(4.f / p.tau_neg));
    dterm = select(in_range, -a * 4.f * e * inv * inv * ratio, zero);
    clipped = zero != zero;
  } else {
    const vf weight = vclamp(ratio, p.ratio_low, p.ratio_high);
    if constexpr (POLICY == kCISPO) {  // -sg[clamp(ratio)] A logp: the clamped ratio is a constant weight
      term = -a * weight * lp;
      dterm = -a * weight;
      clipped = (ratio < p.ratio_low) | (ratio > p.ratio_high);
    } else {  // ppo, and gspo with the row's ratio
      const vf pg1 = -a * ratio;
      const vf pg2 = -a * weight;
      clipped = pg2 > pg1;
      term = select(clipped, pg2, pg1);
      dterm = select(clipped, zero, pg1);  // d(-A ratio)/dlogp = -A ratio
      if constexpr (POLICY == kPPO) {
        if (p.dual) {
          const vf pg3 = -a * p.dual_clip;
          const vi capped = (a < 0.f) & (pg3 < term);
          term = select(capped, pg3, term);
          dterm = select(capped, zero, dterm);
        }
      }
      dterm = select(in_range, dterm, zero);
    }
  }
}

// One call's tensors, [R, T] row-major.
template <typename mask_t>
struct PolicyArgs {
  const float* logp;      // [R, T]
  const float* old_logp;  // [R, T]
  const float* adv;       // [R, T]
  const mask_t* mask;     // [R, T]
  const float* ref;       // [R, T] or nullptr (KIND == kNoRef)
  const float* weights;   // [R, T] rollout IS weights, or nullptr (1)
  float* dloss;           // [R, T] out: mask * dL/dlogp
  float* partials;        // [R, kNumPartials] out
  int64_t T;
  PolicyParams p;
};

template <typename mask_t, int KIND, int POLICY>
RLHF_INLINE void policy_rows(const PolicyArgs<mask_t>& args, int64_t row_begin, int64_t row_end) {
  const float *logp = args.logp, *old_logp = args.old_logp, *adv = args.adv, *ref = args.ref;
  const float* weights = args.weights;
  const mask_t* mask = args.mask;
  float *dloss = args.dloss, *partials = args.partials;
  const int64_t T = args.T;
  const PolicyParams& p = args.p;
  const vf zero = splat(0.f), neg_inf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t r = row_begin; r < row_end; ++r) {
    float seq_ratio = 0.f;
    bool seq_live = false;
    if constexpr (POLICY == kGSPO) {  // a first pass: the row's mean log-ratio
      vf sum_diff = zero, sum_m = zero;
      for (int64_t t = 0; t < T; t += W) {
        const int64_t i = r * T + t, n = std::min(W, T - t);
        const vf m = load(mask + i, n);
        sum_diff += select(m != 0.f, (load(logp + i, n) - load(old_logp + i, n)) * m, zero);
        sum_m += m;
      }
      const float count = hsum(sum_m), mean = hsum(sum_diff) / (count != 0.f ? count : 1.f);
      seq_live = mean <= 10.f;
      seq_ratio = std::exp(std::min(mean, 10.f));
    }
    vf sum_loss = zero, sum_mask = zero, sum_clip = zero, sum_akl = zero, sum_ratio = zero, sum_kl = zero;
    vf ratio_max = neg_inf;
    for (int64_t t = 0; t < T; t += W) {
      const int64_t i = r * T + t, n = std::min(W, T - t);  // the row's tail is zero-padded: mask 0
      const vf m = load(mask + i, n);
      const vi live = m != 0.f;  // padding may hold anything: it contributes exactly 0
      const vf lp = select(live, load(logp + i, n), zero);
      const vf old = select(live, load(old_logp + i, n), zero);
      const vf a = select(live, load(adv + i, n), zero);
      vf loss, dl, ratio;
      vi clipped;
      policy_term<POLICY>(lp, old, a, seq_ratio, seq_live, p, loss, dl, clipped, ratio);
      if (weights != nullptr) {
        const vf w = select(live, load(weights + i, n), zero);
        loss *= w;
        dl *= w;
      }
      if constexpr (KIND != kNoRef) {
        vf kl, dkl;
        kl_and_grad<KIND>(lp, select(live, load(ref + i, n), zero), kl, dkl);
        loss += p.kl_coef * kl;
        dl += p.kl_coef * dkl;
        sum_kl += select(live, kl * m, zero);
      }
      store(dloss + i, select(live, dl * m, zero), n);
      sum_loss += select(live, loss * m, zero);
      sum_mask += m;
      sum_clip += select(live & clipped, m, zero);
      sum_akl += select(live, (old - lp) * m, zero);
      sum_ratio += select(live, ratio * m, zero);
      const vf live_ratio = select(live, ratio, neg_inf);
      ratio_max = select(live_ratio > ratio_max, live_ratio, ratio_max);
    }
    float* out = partials + r * kNumPartials;
    out[0] = hsum(sum_loss);
    out[1] = hsum(sum_mask);
    out[2] = hsum(sum_clip);
    out[3] = hsum(sum_akl);
    out[4] = hsum(sum_ratio);
    out[5] = hmax(ratio_max);
    out[6] = hsum(sum_kl);
  }
}

// The row loop once per target (see the NOTE at the top).
template <typename mask_t, int KIND, int POLICY>
void policy_rows_baseline(const PolicyArgs<mask_t>& args, int64_t begin, int64_t end) {
  policy_rows<mask_t, KIND, POLICY>(args, begin, end);
}

#if defined(__x86_64__)
template <typename mask_t, int KIND, int POLICY>
__attribute__((target("avx2,fma"))) void policy_rows_avx2(const PolicyArgs<mask_t>& args, int64_t begin,
                                                          int64_t end) {
  policy_rows<mask_t, KIND, POLICY>(args, begin, end);
}
#endif

template <typename mask_t, int KIND, int POLICY>
void run_rows(const PolicyArgs<mask_t>& args, int64_t begin, int64_t end) {
#if defined(__x86_64__)
  if (simd::use_avx2()) return policy_rows_avx2<mask_t, KIND, POLICY>(args, begin, end);
#endif
  policy_rows_baseline<mask_t, KIND, POLICY>(args, begin, end);
}

// Picks the instantiation for the runtime (mask dtype, kl kind, policy kind) once per call.
template <typename mask_t, int KIND>
void run_policy(int policy, const PolicyArgs<mask_t>& args, int64_t begin, int64_t end) {
  switch (policy) {
    case kPPO:
      return run_rows<mask_t, KIND, kPPO>(args, begin, end);
    case kGSPO:
      return run_rows<mask_t, KIND, kGSPO>(args, begin, end);
    case kCISPO:
      return run_rows<mask_t, KIND, kCISPO>(args, begin, end);
    case kSAPO:
      return run_rows<mask_t, KIND, kSAPO>(args, begin, end);
    default:
      TORCH_CHECK(false, "ppo_policy_loss_fwd: unknown policy kind ", policy);
  }
}

template <typename mask_t>
void run_kind(int kind, int policy, const PolicyArgs<mask_t>& args, int64_t begin, int64_t end) {
  switch (kind) {
    case kNoRef:
      return run_policy<mask_t, kNoRef>(policy, args, begin, end);
    case kK1:
      return run_policy<mask_t, kK1>(policy, args, begin, end);
    case kAbs:
      return run_policy<mask_t, kAbs>(policy, args, begin, end);
    case kK2:
      return run_policy<mask_t, kK2>(policy, args, begin, end);
    case kK3:
      return run_policy<mask_t, kK3>(policy, args, begin, end);
    default:
      TORCH_CHECK(false, "ppo_policy_loss_fwd: unknown kl kind ", kind);
  }
}

void check_rows(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& like, bool float_only) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be on the CPU, found ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes(), op, ": ", arg, " must be [R, T] = ", like.sizes(),
              ", found ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous");
  if (float_only) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, found ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBool, op, ": ", arg,
                " must be float32 or bool, found ", t.scalar_type());
  }
}

int64_t grain_rows(int64_t T) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1)); }

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_fwd_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                          const at::Tensor& advantages, const at::Tensor& mask,
                                                          const std::optional<at::Tensor>& ref_logp,
                                                          const std::optional<at::Tensor>& is_weights, int64_t policy,
                                                          double ratio_low, double ratio_high, double dual_clip,
                                                          double kl_coef, int64_t kl_kind, double tau_pos,
                                                          double tau_neg) {
  constexpr const char* op = "ppo_policy_loss_fwd";
  TORCH_CHECK(logp.dim() == 2, op, ": logp must be [R, T], found ", logp.sizes());
  check_rows(op, "logp", logp, logp, true);
  check_rows(op, "old_logp", old_logp, logp, true);
  check_rows(op, "advantages", advantages, logp, true);
  check_rows(op, "mask", mask, logp, false);
  if (ref_logp.has_value()) check_rows(op, "ref_logp", *ref_logp, logp, true);
  if (is_weights.has_value()) check_rows(op, "is_weights", *is_weights, logp, true);
  TORCH_CHECK(policy >= kPPO && policy <= kSAPO, op, ": policy must be 0..3 (ppo, gspo, cispo, sapo), found ",
              policy);
  TORCH_CHECK(kl_kind >= 0 && kl_kind <= 3, op, ": kl_kind must be 0..3 (k1, abs, k2, k3), found ", kl_kind);
  TORCH_CHECK(ratio_low < ratio_high, op, ": ratio_low ", ratio_low, " must be below ratio_high ", ratio_high);
  TORCH_CHECK(tau_pos > 0.0 && tau_neg > 0.0, op, ": tau_pos and tau_neg must be > 0, found ", tau_pos, ", ",
              tau_neg);
  TORCH_CHECK(dual_clip <= 0.0 || policy == kPPO, op, ": dual_clip applies to policy 0 (ppo) only");

  const int64_t R = logp.size(0), T = logp.size(1);
  auto dloss = at::empty({R, T}, logp.options());
  auto partials = at::empty({R, kNumPartials}, logp.options());
  const PolicyParams p{static_cast<float>(ratio_low), static_cast<float>(ratio_high), static_cast<float>(dual_clip),
                       static_cast<float>(kl_coef),   static_cast<float>(tau_pos),    static_cast<float>(tau_neg),
                       dual_clip > 0.0};
  const int kind = ref_logp.has_value() ? static_cast<int>(kl_kind) : kNoRef;
  const int pol = static_cast<int>(policy);
  const float* ref = ref_logp.has_value() ? ref_logp->data_ptr<float>() : nullptr;
  const float* w = is_weights.has_value() ? is_weights->data_ptr<float>() : nullptr;
  const float *lp = logp.data_ptr<float>(), *old = old_logp.data_ptr<float>(), *adv = advantages.data_ptr<float>();
  float *dl = dloss.data_ptr<float>(), *part = partials.data_ptr<float>();
  at::parallel_for(0, R, grain_rows(T), [&](int64_t begin, int64_t end) {
    if (mask.scalar_type() == at::kBool) {
      run_kind(kind, pol, PolicyArgs<bool>{lp, old, adv, mask.data_ptr<bool>(), ref, w, dl, part, T, p}, begin, end);
    } else {
      run_kind(kind, pol, PolicyArgs<float>{lp, old, adv, mask.data_ptr<float>(), ref, w, dl, part, T, p}, begin,
               end);
    }
  });
  return {dloss, partials};
}

template <typename mask_t>
void gae_rows(const float* rewards, const float* values, const mask_t* mask, float* advantages, float* returns,
              int64_t T, int64_t row_begin, int64_t row_end, float gamma, float lam) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    float next_value = 0.f, last_gae = 0.f;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t i = r * T + t;
      if (static_cast<float>(mask[i]) == 0.f) {  // skipped: neither contributes nor breaks the recursion
        advantages[i] = 0.f;
        returns[i] = 0.f;
        continue;
      }
      const float delta = rewards[i] + gamma * next_value - values[i];
      last_gae = delta + gamma * lam * last_gae;
      advantages[i] = last_gae;
      returns[i] = last_gae + values[i];
      next_value = values[i];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  constexpr const char* op = "gae";
  TORCH_CHECK(rewards.dim() == 2, op, ": rewards must be [R, T], found ", rewards.sizes());
  check_rows(op, "rewards", rewards, rewards, true);
  check_rows(op, "values", values, rewards, true);
  check_rows(op, "mask", mask, rewards, false);
  const int64_t R = rewards.size(0), T = rewards.size(1);
  auto advantages = at::empty({R, T}, rewards.options());
  auto returns = at::empty({R, T}, rewards.options());
  const float g = static_cast<float>(gamma), l = static_cast<float>(lam);
  at::parallel_for(0, R, grain_rows(T), [&](int64_t begin, int64_t end) {
    if (mask.scalar_type() == at::kBool) {
      gae_rows(rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<bool>(),
               advantages.data_ptr<float>(), returns.data_ptr<float>(), T, begin, end, g, l);
    } else {
      gae_rows(rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<float>(),
               advantages.data_ptr<float>(), returns.data_ptr<float>(), T, begin, end, g, l);
    }
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd_cpu);
  m.impl("gae", &gae_cpu);
}

}  // namespace rlhf_engine
