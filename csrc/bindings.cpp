// The one place that talks to Python: the op schemas (implementations in cache_ops.cpp, attention.cpp, ppo_ops.cpp
// and cuda/*.cpp) and the pybind11 module rlhf_engine._C (BlockPool, has_cuda).

#include <pybind11/stl.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "block_pool.h"

// Writes are marked (Tensor!) so functionalization and torch.compile know which inputs change.
TORCH_LIBRARY(rlhf_engine, m) {
  m.def(
      "write_kv(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, Tensor slot_mapping) -> ()");
  m.def("copy_blocks(Tensor! key_cache, Tensor! value_cache, Tensor block_mapping) -> ()");
  // Decode attention over the paged cache (attention.cpp, cuda/attention_cuda.cpp; layouts in attention.h).
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, int sliding_window=0, float softcap=0.0) -> Tensor");
  // PPO objective, CPU twins of the Triton kernels (rlhf_engine.ops.ppo): policy 0..3 = ppo, gspo, cispo, sapo;
  // dual_clip <= 0 means none; kl_kind 0..3 = k1, abs, k2, k3; is_weights multiply the policy term.
  // Returns (mask * dL/dlogp [R, T], per-row partial sums [R, 7]).
  m.def(
      "ppo_policy_loss_fwd(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, "
      "Tensor? is_weights, int policy, float ratio_low, float ratio_high, float dual_clip, float kl_coef, "
      "int kl_kind, float tau_pos, float tau_neg) -> (Tensor, Tensor)");
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
}

namespace py = pybind11;
using rlhf_engine::BlockPool;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_engine native extension: paged KV block pool; cache ops live in torch.ops.rlhf_engine";

  m.def(
      "has_cuda",
      [] {
#ifdef RLHF_ENGINE_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels of the cache ops were compiled into this build.");

  py::register_exception<rlhf_engine::OutOfBlocksError>(m, "OutOfBlocksError", PyExc_RuntimeError);

  py::class_<BlockPool>(m, "BlockPool", R"doc(
Paged KV-cache block pool: fixed-size blocks of `block_size` token slots, an O(1) free list, a refcount per
block, and a block table plus a token count per sequence id (int64).

A token at position t of a sequence lives in slot block_table[t // block_size] * block_size + t % block_size
of a cache shaped [num_blocks, block_size, kv_heads, head_dim] (viewed as [num_blocks * block_size, ...]).
Full prompt blocks are cached by prefix (allocate_prompt, reset_prefix_cache). Bad arguments raise ValueError;
running out of blocks raises OutOfBlocksError (a RuntimeError). A call that raises leaves the pool unchanged.)doc")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"),
           "Pool of num_blocks blocks of block_size token slots each; both must be > 0.")
      .def("allocate", &BlockPool::allocate, py::arg("seq_id"), py::arg("num_tokens"),
           "Registers a new sequence holding num_tokens tokens with ceil(num_tokens / block_size) fresh blocks; "
           "returns its block table (list of block ids). ValueError if seq_id exists.")
      .def(
          "append_slot",
          [](BlockPool& p, int64_t seq_id) {
            const auto r = p.append_slot(seq_id);
            return std::make_tuple(r.slot, r.cow_src, r.cow_dst);
          },
          py::arg("seq_id"),
          "Reserves room for one more token; returns (slot, cow_src, cow_dst). A new block is taken when the last "
          "one is full; when the last block is shared (refcount > 1) it is copied first: this sequence gets a fresh "
          "block and the caller must copy block cow_src into cow_dst (copy_blocks) before writing the slot. "
          "(cow_src, cow_dst) = (-1, -1) when there is nothing to copy.")
      .def("fork", &BlockPool::fork, py::arg("parent_id"), py::arg("child_id"),
           "New sequence child_id sharing every block of parent_id (refcount + 1 each), same token count.")
      .def("free", &BlockPool::free, py::arg("seq_id"),
           "Drops seq_id; blocks whose refcount reaches 0 return to the free list. ValueError on an unknown id "
           "(double free).")
      .def("allocate_prompt", &BlockPool::allocate_prompt, py::arg("seq_id"), py::arg("token_ids"),
           R"doc(Registers a new sequence holding the prompt token_ids (list of int) and returns how many of its leading
tokens already have their KV cached: the caller prefills tokens [returned, len(token_ids)) only.

Prefix caching: a full block is keyed by a hash of its tokens chained with the key of the block before it. The
longest leading run of the prompt's full blocks whose keys are cached is reused (refcount + 1; a cached block in
the free list is revived), except the block holding the last token, which is always fresh: the returned count is a
multiple of block_size and at most (len - 1) rounded down to one, so there is at least one token to prefill (for
the logits) and the prefill never writes a shared block. The fresh full blocks are keyed at once, so the caller
must write their KV in the prefill that follows; a prompt allocated for the same batched prefill may already reuse
them, which is fine as long as each layer writes its KV (write_kv) before its attention reads the cache.
OutOfBlocksError when the fresh blocks do not fit (the pool is left unchanged); ValueError if seq_id exists.)doc")
      .def("reset_prefix_cache", &BlockPool::reset_prefix_cache,
           "Forgets every cached prefix (the blocks stay allocated or free as they were). Cached KV depends on the "
           "weights: the RLHF trainer calls this after every optimizer step.")
      .def("num_cached_blocks", &BlockPool::num_cached_blocks,
           "Blocks with a prefix key (in use or free but not yet evicted).")
      .def("prefix_queries", &BlockPool::prefix_queries,
           "Full prompt blocks allocate_prompt could have reused (the last token's block excluded), in total.")
      .def("prefix_hits", &BlockPool::prefix_hits,
           "Full prompt blocks allocate_prompt did reuse, in total; prefix_hits() / prefix_queries() is the hit rate.")
      .def("block_key", &BlockPool::block_key, py::arg("block_id"),
           "The prefix key (an int in [0, 2**64)) of block_id, or None when it caches no prefix.")
      .def("can_allocate", &BlockPool::can_allocate, py::arg("num_tokens"),
           "Whether allocate(_, num_tokens) would find enough free blocks.")
      .def("blocks_needed", &BlockPool::blocks_needed, py::arg("num_tokens"),
           "ceil(num_tokens / block_size): blocks that hold num_tokens tokens.")
      .def("num_free_blocks", &BlockPool::num_free_blocks, "Blocks with refcount 0.")
      .def("num_blocks", &BlockPool::num_blocks, "Total blocks in the pool.")
      .def("block_size", &BlockPool::block_size, "Token slots per block.")
      .def("num_sequences", &BlockPool::num_sequences, "Live sequences.")
      .def("has_sequence", &BlockPool::has_sequence, py::arg("seq_id"), "Whether seq_id is live.")
      .def("block_table", &BlockPool::block_table, py::arg("seq_id"),
           "Block ids of seq_id in token order (a copy, as a list).")
      .def("num_tokens", &BlockPool::num_tokens, py::arg("seq_id"), "Tokens held by seq_id.")
      .def("refcount", &BlockPool::refcount, py::arg("block_id"), "Sequences referencing block_id.")
      .def("slot_mapping", &BlockPool::slot_mapping, py::arg("seq_id"), py::arg("start"), py::arg("end"),
           "Slots of token positions [start, end) of seq_id, as a list; 0 <= start <= end <= num_tokens(seq_id).")
      .def("check_invariants", &BlockPool::check_invariants,
           "Raises RuntimeError naming the first broken invariant: refcounts equal block-table references, a "
           "block is free iff its refcount is 0, each sequence holds exactly the blocks its tokens need, the prefix "
           "keys agree with the key map and their blocks' tokens, and keyed blocks are full, chained in order at the "
           "start of every block table holding them (so they are never written).")
      .def("__repr__", [](const BlockPool& p) {
        return "BlockPool(num_blocks=" + std::to_string(p.num_blocks()) +
               ", block_size=" + std::to_string(p.block_size()) +
               ", free=" + std::to_string(p.num_free_blocks()) +
               ", cached=" + std::to_string(p.num_cached_blocks()) +
               ", sequences=" + std::to_string(p.num_sequences()) + ")";
      });
}
