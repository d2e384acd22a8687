// Paged decode attention (schema in bindings.cpp): the CPU kernel, the Meta kernel used by FakeTensor /
// torch.compile, and the argument checks every backend shares (attention.h, which also gives the layouts).
//
// The work unit is a (sequence, kv head) pair: the num_heads / kv_heads query heads sharing that kv head read each
// K and V row once, while it is in L1. Per block of the sequence's block table:
//   s[g, t] = scale * q[g] . k[t]                                       scores of the group, t in the block
//   m' = max(m, max_t s[g, t]),  alpha = exp(m - m'),  p[g, t] = exp(s[g, t] - m')
//   l = alpha * l + sum_t p[g, t],  acc[g] = alpha * acc[g] + sum_t p[g, t] v[t]
// (an online softmax, rescaled once per block), and at the end out[g] = acc[g] / l. All of it in fp32.
//
// NOTE: explicit SIMD through GCC/Clang vector extensions, 8 floats wide (ppo_ops.cpp says why we write the vectors
// out rather than hope for auto-vectorisation). The build targets the x86-64 baseline, where an 8-float vector is
// a pair of SSE registers; the same code is compiled a second time under target("avx2,fma,f16c") (one YMM
// register, fused multiply-add, hardware fp16 conversion) and that copy runs when the CPU has those and torch's CPU
// capability allows AVX2 (ATEN_CPU_CAPABILITY=default forces the baseline copy, which is how the tests reach it).
// The helpers are always_inline so each copy is compiled for its own target.

#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cache_ops.h"
#include "simd.h"


namespace rlhf_engine {

void check_paged_attention_args(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens) {
  constexpr const char* op = "paged_attention";
  check_cache_pair(op, key_cache, value_cache);
  TORCH_CHECK(query.dim() == 3, op, ": query must be [num_seqs, num_heads, head_dim], found ", query.dim(), " dims ",
              query.sizes());
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type(), op, ": query dtype ", query.scalar_type(),
              " must be the cache dtype ", key_cache.scalar_type());
  TORCH_CHECK(query.device() == key_cache.device(), op, ": query is on ", query.device(), " but the caches are on ",
              key_cache.device());
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), kv_heads = key_cache.size(2);
  TORCH_CHECK(query.size(2) == key_cache.size(3), op, ": query head_dim ", query.size(2),
              " differs from the cache head_dim ", key_cache.size(3));
  TORCH_CHECK(kv_heads > 0 && num_heads % kv_heads == 0, op, ": kv_heads ", kv_heads,
              " (key_cache.size(2)) must divide num_heads ", num_heads, " (query.size(1))");
  TORCH_CHECK(query.size(2) <= 1 || query.stride(2) == 1, op,
              ": query must be contiguous in head_dim, found strides ", query.strides());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs, op,
              ": block_tables must be [num_seqs, max_blocks_per_seq] with num_seqs = ", num_seqs, ", found ",
              block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == num_seqs, op,
              ": context_lens must be [num_seqs] = [", num_seqs, "], found ", context_lens.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"block_tables", block_tables},
                                {"context_lens", context_lens}}) {
    TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                " must be int32 or int64, found ", t.scalar_type());
    TORCH_CHECK(t.device() == key_cache.device(), op, ": ", name, " is on ", t.device(), " but the caches are on ",
                key_cache.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
}

namespace {

// ---- 8-float vectors ---------------------------------------------------------------------------------------

constexpr int64_t W = 8;
typedef float vf __attribute__((vector_size(32)));
// The same vector at any float address (like __m256_u): loads and stores through it need no memcpy, which would
// take the address of the register-held accumulators and keep them in memory.
typedef float vf_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t vu16_u __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t vu32 __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
// NOTE: a cast between vectors of the same size reinterprets the bits.

RLHF_INLINE vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }

RLHF_INLINE vf load(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  return (vf)(__builtin_convertvector(*reinterpret_cast<const vu16_u*>(p), vu32) << 16);
}

// IEEE half -> float in integer arithmetic, eight at a time (c10's fp16_ieee_to_fp32_value, vectorised): exact for
// every half, subnormals, infinities and NaN included. NOTE: no _Float16, which x86 GCC has only from version 12.
RLHF_INLINE vf load(const c10::Half* p) {
  const vu32 w = __builtin_convertvector(*reinterpret_cast<const vu16_u*>(p), vu32) << 16;  // half in the top bits
  const vu32 sign = w & 0x80000000u;
  const vu32 two_w = w + w;  // exponent and mantissa, the sign shifted out
  // A normal half: move exponent and mantissa into place, then rebias the exponent by a multiplication (which
  // also carries infinities and NaN through). A subnormal: the magic-number subtraction normalises it.
  const vf normal = (vf)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const vf subnormal = (vf)((two_w >> 17) | (126u << 23)) - 0.5f;
  return (vf)(sign | (two_w < (1u << 27) ? (vu32)subnormal : (vu32)normal));
}

RLHF_INLINE void store(float* p, const vf& v) { *reinterpret_cast<vf_u*>(p) = v; }

// For constants only (they fold into one vector constant); a run-time scalar goes in as scalar * vector instead.
RLHF_INLINE vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }

// exp(x) for the softmax's x = s - max <= 0: Cody-Waite range reduction and the Cephes polynomial, about 1 ulp.
// Below -87 exp underflows fp32: x is clamped there, giving 2^-125.5, which is 0 next to the max term's 1.
RLHF_INLINE vf exp_nonpositive(const vf& arg) {
  return simd::exp_cephes<vf, vi, 128>(arg < -87.f ? splat(-87.f) : arg);
}

RLHF_INLINE float hsum(const vf& v) {
  const auto four = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const auto two = __builtin_shufflevector(four, four, 0, 1) + __builtin_shufflevector(four, four, 2, 3);
  return two[0] + two[1];
}

// ---- one (sequence, kv head) -------------------------------------------------------------------------------

constexpr int64_t kMaxTile = 4;  // query heads per pass over a block: their accumulators stay in registers

struct Problem {
  const void* query;  // [num_seqs, num_heads, head_dim], strides q_seq_stride, q_head_stride
  const void* key_cache;    // [num_blocks, block_size, kv_heads, head_dim]
  const void* value_cache;  // [num_blocks, block_size, kv_heads, head_dim]
  void* out;                // [num_seqs, num_heads, head_dim]
  const int32_t* tables32;  // [num_seqs, max_blocks] when block_tables is int32, else nullptr
  const int64_t* tables64;  // [num_seqs, max_blocks] when block_tables is int64, else nullptr
  const int64_t* context_lens;  // [num_seqs], validated
  int64_t q_seq_stride, q_head_stride, max_blocks, num_heads, kv_heads, head_dim, block_size;
  float scale;
  int64_t sliding_window;  // > 0: attend to the last sliding_window tokens of the context only
  float softcap;           // > 0: scores become softcap * tanh(score / softcap) (Gemma 2)

  // Element offset, in either cache, of the first token of block j of sequence seq in kv head kv_head.
  int64_t row_offset(int64_t seq, int64_t j, int64_t kv_head) const {
    const int64_t block = tables64 != nullptr ? tables64[seq * max_blocks + j] : tables32[seq * max_blocks + j];
    return (block * block_size * kv_heads + kv_head) * head_dim;
  }
};

// Scores of a block per query head, padded to whole vectors.
int64_t score_stride(const Problem& p) { return (p.block_size + W - 1) / W * W; }

// Scratch floats one task needs: see attend().
int64_t scratch_floats(const Problem& p) {
  const int64_t group = p.num_heads / p.kv_heads;
  return group * (2 * p.head_dim + score_stride(p) + 3);
}

// Online-softmax step for one query head over the scores s[0, n) of a block (s is padded to whole vectors, the
// padding is scratch): s becomes p = exp(s - m'), m and l are updated; returns alpha = exp(m - m').
RLHF_INLINE float softmax_block(float* s, int64_t n, float& m, float& l) {
  const float m_new = std::max(m, *std::max_element(s, s + n));
  for (int64_t t = 0; t < n; t += W) store(s + t, exp_nonpositive(load(s + t) - m_new));
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += s[t];
  const float alpha = std::exp(m - m_new);  // 0 on the first block, where m is -inf
  l = alpha * l + sum;
  m = m_new;
  return alpha;
}

// Asks for the n rows of a kv head in a block (row stride row_stride) ahead of their use.
template <typename T>
RLHF_INLINE void prefetch_rows(const T* rows, int64_t row_stride, int64_t n, int64_t dim) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t d = 0; d < dim; d += kLine) __builtin_prefetch(rows + t * row_stride + d);
  }
}

// s[g * s_stride + t] = q[g] . k_t for g < NQ and NT consecutive tokens t (row stride row_stride).
template <int NQ, int NT, typename T>
RLHF_INLINE void dot_rows(const float* q, int64_t q_stride, const T* k, int64_t row_stride, int64_t dim, float* s,
                          int64_t s_stride) {
  const int64_t vec_dim = dim / W * W;
  vf acc[NT][NQ] = {};
  for (int64_t d = 0; d < vec_dim; d += W) {
    vf kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = load(k + t * row_stride + d);
    for (int g = 0; g < NQ; ++g) {
      const vf qv = load(q + g * q_stride + d);
      for (int t = 0; t < NT; ++t) acc[t][g] += qv * kv[t];
    }
  }
  for (int g = 0; g < NQ; ++g) {
    for (int t = 0; t < NT; ++t) {
      float sum = hsum(acc[t][g]);
      for (int64_t d = vec_dim; d < dim; ++d) sum += q[g * q_stride + d] * static_cast<float>(k[t * row_stride + d]);
      s[g * s_stride + t] = sum;
    }
  }
}

template <int NQ, typename T>
RLHF_INLINE void block_scores(const float* q, int64_t q_stride, const T* k, int64_t row_stride, int64_t n,
                              int64_t dim, float* s, int64_t s_stride) {
  int64_t t = 0;
  // NOTE: two tokens at a time: 2 * NQ independent accumulators keep the FMA units busy.
  for (; t + 2 <= n; t += 2) dot_rows<NQ, 2>(q, q_stride, k + t * row_stride, row_stride, dim, s + t, s_stride);
  if (t < n) dot_rows<NQ, 1>(q, q_stride, k + t * row_stride, row_stride, dim, s + t, s_stride);
}

// acc[g] = alpha[g] * acc[g] + sum_{t < n} p[g * p_stride + t] * v_t, for g < NQ.
// NOTE: one vector per query head and column chunk (NQ FMA chains over t): two per head (8 chains) measured about
// 10% slower on the machine this was tuned on (AMD EPYC, AVX2).
template <int NQ, typename T>
RLHF_INLINE void block_values(const float* p, int64_t p_stride, const float* alpha, const T* v, int64_t row_stride,
                              int64_t n, int64_t dim, float* acc, int64_t acc_stride) {
  const int64_t vec_dim = dim / W * W;
  for (int64_t d = 0; d < vec_dim; d += W) {
    vf a[NQ];
    for (int g = 0; g < NQ; ++g) a[g] = load(acc + g * acc_stride + d) * alpha[g];
    for (int64_t t = 0; t < n; ++t) {
      const vf x = load(v + t * row_stride + d);
      // NOTE: scalar * vector, not splat(scalar) * vector: GCC builds the latter with a chain of inserts here.
      for (int g = 0; g < NQ; ++g) a[g] += p[g * p_stride + t] * x;
    }
    for (int g = 0; g < NQ; ++g) store(acc + g * acc_stride + d, a[g]);
  }
  for (int64_t d = vec_dim; d < dim; ++d) {
    for (int g = 0; g < NQ; ++g) {
      float a = acc[g * acc_stride + d] * alpha[g];
      for (int64_t t = 0; t < n; ++t) a += p[g * p_stride + t] * static_cast<float>(v[t * row_stride + d]);
      acc[g * acc_stride + d] = a;
    }
  }
}

// The group's query heads in tiles of at most kMaxTile (a switch rather than a generic lambda: a lambda would be
// compiled for the baseline target even inside the AVX2 copy).
template <typename T>
RLHF_INLINE void group_scores(const float* q, const T* k, int64_t row_stride, int64_t n, int64_t group, int64_t dim,
                              float* s, int64_t bs) {
  for (int64_t g0 = 0; g0 < group; g0 += kMaxTile) {
    const float* qt = q + g0 * dim;  // [tile, dim]
    float* st = s + g0 * bs;         // [tile, bs]
    switch (std::min(kMaxTile, group - g0)) {
      case 4: block_scores<4>(qt, dim, k, row_stride, n, dim, st, bs); break;
      case 3: block_scores<3>(qt, dim, k, row_stride, n, dim, st, bs); break;
      case 2: block_scores<2>(qt, dim, k, row_stride, n, dim, st, bs); break;
      default: block_scores<1>(qt, dim, k, row_stride, n, dim, st, bs); break;
    }
  }
}

template <typename T>
RLHF_INLINE void group_values(const float* p, const float* alpha, const T* v, int64_t row_stride, int64_t n,
                              int64_t group, int64_t dim, float* acc, int64_t bs) {
  for (int64_t g0 = 0; g0 < group; g0 += kMaxTile) {
    const float* pt = p + g0 * bs;  // [tile, bs]
    float* at = acc + g0 * dim;     // [tile, dim]
    switch (std::min(kMaxTile, group - g0)) {
      case 4: block_values<4>(pt, bs, alpha + g0, v, row_stride, n, dim, at, dim); break;
      case 3: block_values<3>(pt, bs, alpha + g0, v, row_stride, n, dim, at, dim); break;
      case 2: block_values<2>(pt, bs, alpha + g0, v, row_stride, n, dim, at, dim); break;
      default: block_values<1>(pt, bs, alpha + g0, v, row_stride, n, dim, at, dim); break;
    }
  }
}

// Attention of the query heads of kv head `kv_head` of sequence `seq`; scratch holds scratch_floats(p) floats.
template <typename T>
RLHF_INLINE void attend(const Problem& p, int64_t seq, int64_t kv_head, float* scratch) {
  const int64_t group = p.num_heads / p.kv_heads, dim = p.head_dim, bs = p.block_size;
  const int64_t ctx = p.context_lens[seq];
  T* out = static_cast<T*>(p.out) + (seq * p.num_heads + kv_head * group) * dim;  // [group, dim]
  if (ctx == 0) {
    std::fill_n(out, group * dim, T(0.f));
    return;
  }
  const int64_t ss = score_stride(p);
  float* q = scratch;             // [group, dim] scaled query rows
  float* acc = q + group * dim;   // [group, dim]
  float* s = acc + group * dim;   // [group, ss] scores, then probabilities
  float* m = s + group * ss;      // [group] running max
  float* l = m + group;           // [group] running sum
  float* alpha = l + group;       // [group] rescale of this block
  const T* query = static_cast<const T*>(p.query) + seq * p.q_seq_stride + kv_head * group * p.q_head_stride;
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d = 0; d < dim; ++d) q[g * dim + d] = static_cast<float>(query[g * p.q_head_stride + d]) * p.scale;
  }
  std::fill_n(acc, group * dim, 0.f);
  std::fill_n(m, group, -std::numeric_limits<float>::infinity());
  std::fill_n(l, group, 0.f);

  const T* key_cache = static_cast<const T*>(p.key_cache);
  const T* value_cache = static_cast<const T*>(p.value_cache);
  const int64_t row_stride = p.kv_heads * dim;  // between the tokens of a block
  const int64_t num_blocks = (ctx + bs - 1) / bs;
  // a sliding window reads from token `first` on: the blocks before it are skipped, the first one in part
  const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, ctx - p.sliding_window) : 0;
  const int64_t j0 = first / bs;
  int64_t offset = p.row_offset(seq, j0, kv_head);
  for (int64_t j = j0; j < num_blocks; ++j) {
    const int64_t skip = j == j0 ? first - j0 * bs : 0;  // tokens of this block before the window
    const T* k = key_cache + offset + skip * row_stride;    // [n, row_stride], dim used
    const T* v = value_cache + offset + skip * row_stride;  // [n, row_stride], dim used
    const int64_t n = std::min(bs, ctx - j * bs) - skip;
    // NOTE: the blocks of a sequence are scattered, which defeats the hardware prefetcher at every block boundary:
    // ask for the next block's rows while this one is computed.
    if (j + 1 < num_blocks) {
      offset = p.row_offset(seq, j + 1, kv_head);
      const int64_t n_next = std::min(bs, ctx - (j + 1) * bs);
      prefetch_rows(key_cache + offset, row_stride, n_next, dim);
      prefetch_rows(value_cache + offset, row_stride, n_next, dim);
    }
    group_scores(q, k, row_stride, n, group, dim, s, ss);
    if (p.softcap > 0.f) {
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t t = 0; t < n; ++t) s[g * ss + t] = p.softcap * std::tanh(s[g * ss + t] / p.softcap);
      }
    }
    for (int64_t g = 0; g < group; ++g) alpha[g] = softmax_block(s + g * ss, n, m[g], l[g]);
    group_values(s, alpha, v, row_stride, n, group, dim, acc, ss);
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / l[g];
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] = static_cast<T>(acc[g * dim + d] * inv);
  }
}

// The tasks [begin, end) (task = seq * kv_heads + kv_head), compiled once per target.
template <typename T>
void attend_tasks(const Problem& p, int64_t begin, int64_t end, float* scratch) {
  for (int64_t task = begin; task < end; ++task) attend<T>(p, task / p.kv_heads, task % p.kv_heads, scratch);
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void attend_tasks_avx2(const Problem& p, int64_t begin, int64_t end,
                                                                  float* scratch) {
  for (int64_t task = begin; task < end; ++task) attend<T>(p, task / p.kv_heads, task % p.kv_heads, scratch);
}

#endif

// Reads context_lens and the block ids they reach, so the kernel never indexes outside the cache.
std::vector<int64_t> checked_context_lens(const at::Tensor& block_tables, const at::Tensor& context_lens,
                                          int64_t num_blocks, int64_t block_size) {
  constexpr const char* op = "paged_attention";
  const int64_t num_seqs = context_lens.size(0), max_blocks = block_tables.size(1);
  const at::Tensor lens = context_lens.to(at::kLong);
  const at::Tensor tables = block_tables.to(at::kLong);
  const int64_t* len = lens.const_data_ptr<int64_t>();       // [num_seqs]
  const int64_t* table = tables.const_data_ptr<int64_t>();   // [num_seqs, max_blocks]
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= max_blocks * block_size, op, ": context_lens[", b, "] = ", len[b],
                      " out of range [0, ", max_blocks * block_size,
                      "] (max_blocks_per_seq * block_size = the tokens block_tables can hold)");
    for (int64_t j = 0; j < (len[b] + block_size - 1) / block_size; ++j) {
      const int64_t id = table[b * max_blocks + j];
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, op, ": block_tables[", b, ", ", j, "] = ", id,
                        " out of range [0, ", num_blocks, ") (num_blocks); it holds tokens of context_lens[", b,
                        "] = ", len[b]);
    }
  }
  return std::vector<int64_t>(len, len + num_seqs);
}

at::Tensor paged_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                               int64_t sliding_window, double softcap) {
  check_paged_attention_args(query, key_cache, value_cache, block_tables, context_lens);
  TORCH_CHECK_VALUE(sliding_window >= 0, "paged_attention: sliding_window must be >= 0 (0: none), found ",
                    sliding_window);
  TORCH_CHECK_VALUE(softcap >= 0, "paged_attention: softcap must be >= 0 (0: none), found ", softcap);
  TORCH_CHECK(query.device().is_cpu(), "paged_attention: the CPU kernel got tensors on ", query.device());
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = key_cache.size(2), block_size = key_cache.size(1);
  const std::vector<int64_t> lens = checked_context_lens(block_tables, context_lens, key_cache.size(0), block_size);
  at::Tensor out = at::empty({num_seqs, num_heads, head_dim}, query.options());
  if (out.numel() == 0) return out;

  const bool tables64 = block_tables.scalar_type() == at::kLong;
  const Problem p{query.const_data_ptr(), key_cache.const_data_ptr(), value_cache.const_data_ptr(),
                  out.mutable_data_ptr(), tables64 ? nullptr : block_tables.const_data_ptr<int32_t>(),
                  tables64 ? block_tables.const_data_ptr<int64_t>() : nullptr, lens.data(), query.stride(0),
                  query.stride(1), block_tables.size(1), num_heads, kv_heads, head_dim, block_size,
                  static_cast<float>(scale), sliding_window, static_cast<float>(softcap)};

  // NOTE: at::parallel_for hands each thread one equal slice of its range. With ragged context lengths equal task
  // counts are not equal work, so the tasks are cut into one slice per thread of about equal cost (tokens read,
  // plus a fixed cost per task) and the slices are the range.
  const int64_t num_tasks = num_seqs * kv_heads;
  const int64_t slices = std::min<int64_t>(num_tasks, at::get_num_threads());
  std::vector<int64_t> cost(num_tasks + 1, 0);  // prefix sums
  const auto tokens_read = [&](int64_t len) { return sliding_window > 0 ? std::min(len, sliding_window) : len; };
  for (int64_t task = 0; task < num_tasks; ++task) {
    cost[task + 1] = cost[task] + tokens_read(lens[task / kv_heads]) + block_size;
  }
  std::vector<int64_t> bounds(slices + 1, num_tasks);
  for (int64_t i = 0; i < slices; ++i) {
    bounds[i] = std::lower_bound(cost.begin(), cost.end(), cost.back() * i / slices) - cost.begin();
  }

  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(scratch_floats(p));
      for (int64_t i = begin; i < end; ++i) {
#if defined(__x86_64__)
        if (simd::use_avx2()) {
          attend_tasks_avx2<T>(p, bounds[i], bounds[i + 1], scratch.data());
          continue;
        }
#endif
        attend_tasks<T>(p, bounds[i], bounds[i + 1], scratch.data());
      }
    });
  };
  switch (query.scalar_type()) {
    case at::kFloat: run(std::type_identity<float>{}); break;
    case at::kBFloat16: run(std::type_identity<c10::BFloat16>{}); break;
    default: run(std::type_identity<c10::Half>{}); break;  // the checks allow nothing else
  }
  return out;
}

// FakeTensor and torch.compile trace the op through this: metadata checks and the output's shape only.
at::Tensor paged_attention_meta(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                int64_t sliding_window, double softcap) {
  check_paged_attention_args(query, key_cache, value_cache, block_tables, context_lens);
  return at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
}

}  // namespace
}  // namespace rlhf_engine

TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m) { m.impl("paged_attention", &rlhf_engine::paged_attention_cpu); }

TORCH_LIBRARY_IMPL(rlhf_engine, Meta, m) { m.impl("paged_attention", &rlhf_engine::paged_attention_meta); }
