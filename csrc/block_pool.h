// Paged KV-cache block pool (the allocator half of a vLLM-style paged cache).
//
// The pool hands out fixed-size blocks of `block_size` token slots. Each sequence (int64 id) owns a block table
// (the block ids holding its tokens, in order) and a token count. Blocks carry a reference count so that
// `fork` can share a prompt's blocks between samples; a write into a shared, partly filled last block copies
// it first (copy-on-write) and reports the (src, dst) pair so the caller copies the tensor data.
//
// This file is plain C++ (no torch): the tensors live in Python / cache_ops, the pool only does bookkeeping.
//
// Errors, one convention for the whole class:
//   std::invalid_argument  a bad argument (unknown or duplicate seq id, block id out of range, bad count);
//                          pybind11 turns it into ValueError.
//   OutOfBlocksError       not enough free blocks; bound to rlhf_engine._C.OutOfBlocksError (a RuntimeError)
//                          so a scheduler can catch it and preempt.
//   std::logic_error       check_invariants() found corrupted state (a bug in the pool); RuntimeError.
// Every failing call leaves the pool exactly as it was: all checks run before the first mutation.
//
// Prefix caching (SGLang's radix cache, vLLM's automatic prefix caching): a FULL block of a prompt is keyed by a
// 64-bit hash of its token ids chained with the key of the block before it, so a key names the whole prefix up to
// the block's end. allocate_prompt reuses the longest leading run of cached blocks of a new prompt (refcount + 1)
// and registers the fresh full blocks it takes, which the caller prefills. A freed keyed block keeps its key and
// its contents in the free list until it is evicted: the free list is an intrusive doubly linked list in LRU order
// (pop the head = least recently freed; free appends at the tail, a sequence's tail blocks first, so a chain's
// children are evicted before their parents), and a prefix hit revives a free block by unlinking it from the
// middle in O(1). Taking a block from the free list drops its key.
//
// The invariant that makes a key trustworthy: A KEYED BLOCK IS NEVER WRITTEN. Blocks are written only
//   (a) fresh from the free list (allocate, allocate_prompt, a new block in append_slot, a copy-on-write target):
//       pop_free dropped any key they had; allocate_prompt keys its fresh full blocks at once, for the prefill that
//       follows to write (a prompt allocated for the same batched prefill may already reuse them: it reads them
//       in that prefill after each layer's write, as with its own tokens);
//   (b) by append_slot into a partly filled last block, and only full blocks are ever keyed.
// In every block table the keyed blocks form a leading run, block i of the run keyed at depth i with the key of
// block i - 1 as its parent; every keyed block's parent key is itself cached. check_invariants() verifies all of it.
// A hash collision costs at most a cache miss, never wrong KV: a hit is accepted only when the block's stored
// tokens, depth and parent key equal the prompt's.
//
// RLHF: cached KV is a function of the weights, so the trainer calls reset_prefix_cache() after every optimizer
// step; only prompt blocks are keyed (generated tokens are not), as sampled responses are rarely shared.

#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace rlhf_engine {

class OutOfBlocksError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What append_slot reserved: the slot (block_id * block_size + offset) for the new token, and the copy the
// caller must perform before writing it: cow_src -> cow_dst, or (-1, -1) when there is nothing to copy.
struct AppendResult {
  int64_t slot;
  int64_t cow_src;
  int64_t cow_dst;
};

class BlockPool {
 public:
  BlockPool(int64_t num_blocks, int64_t block_size);

  // New sequence with ceil(num_tokens / block_size) blocks; returns its block table.
  const std::vector<int64_t>& allocate(int64_t seq_id, int64_t num_tokens);
  // Reserves the slot of token number num_tokens(seq_id); may take one block (new or copy-on-write).
  AppendResult append_slot(int64_t seq_id);
  // child_id shares every block of parent_id (refcount + 1 each) and starts with the same token count.
  void fork(int64_t parent_id, int64_t child_id);
  // Drops seq_id; blocks whose refcount reaches 0 return to the free list (keyed ones keep their key).
  void free(int64_t seq_id);

  // New sequence holding the len(token_ids) tokens of a prompt. Its leading full blocks whose chained keys are
  // cached are reused (at most (len - 1) / block_size of them: the block holding the last token is always fresh,
  // so the caller always has at least one token to prefill and never writes a shared block); the other blocks are
  // fresh and the fresh full ones get keyed. Returns the number of leading tokens whose KV is already cached
  // (a multiple of block_size, < len(token_ids) unless that is 0): the caller prefills tokens [returned, len).
  int64_t allocate_prompt(int64_t seq_id, const std::vector<int64_t>& token_ids);
  // Drops every key (blocks stay where they are); for when the weights, hence the cached KV, changed.
  void reset_prefix_cache();
  int64_t num_cached_blocks() const { return static_cast<int64_t>(cached_.size()); }
  // Full prompt blocks allocate_prompt could have reused, and those it did reuse, since construction.
  int64_t prefix_queries() const { return prefix_queries_; }
  int64_t prefix_hits() const { return prefix_hits_; }
  // The key of block_id, if it has one.
  std::optional<uint64_t> block_key(int64_t block_id) const;

  bool can_allocate(int64_t num_tokens) const;
  int64_t blocks_needed(int64_t num_tokens) const;
  int64_t num_free_blocks() const { return num_free_; }
  int64_t num_blocks() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t block_size() const { return block_size_; }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int64_t>& block_table(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  int64_t refcount(int64_t block_id) const;
  // Slot of every token position in [start, end) of seq_id; needs 0 <= start <= end <= num_tokens(seq_id).
  std::vector<int64_t> slot_mapping(int64_t seq_id, int64_t start, int64_t end) const;

  // Verifies: every block's refcount equals its number of (sequence, block) references; a block is in the
  // free list iff its refcount is 0; the free list is well linked; each sequence holds exactly
  // blocks_needed(num_tokens) distinct, in-range blocks; the key map and the per-block keys agree, every key
  // hashes from its block's stored tokens and parent key, every parent key is cached, and in every block table
  // the keyed blocks are a leading run of full blocks chained in order (so no keyed block can be written).
  // Throws std::logic_error naming the first violation. O(num_blocks * block_size + total block-table length).
  void check_invariants() const;

 private:
  struct Sequence {
    std::vector<int64_t> blocks;  // block table, in token order
    int64_t num_tokens = 0;
  };

  const Sequence& find(const char* where, const char* arg, int64_t seq_id) const;
  Sequence& find(const char* where, const char* arg, int64_t seq_id);
  void require_new(const char* where, const char* arg, int64_t seq_id) const;
  void require_free(const char* where, int64_t needed) const;

  int64_t pop_free();              // unlinks the head (least recently freed) block, drops its key; refcount -> 1
  void unlink_free(int64_t block);  // takes block out of the free list, wherever it is
  void push_free(int64_t block);   // links block at the tail
  void release(int64_t block);     // refcount - 1; back to the free list at 0

  // Key of a full block of tokens (block_size of them) whose predecessor has key `parent` (kRootKey for block 0).
  uint64_t chain_key(uint64_t parent, const int64_t* tokens) const;
  // The cached block holding exactly these tokens at this depth after this parent, or -1.
  int64_t lookup(uint64_t key, uint64_t parent, int64_t depth, const int64_t* tokens) const;
  void drop_key(int64_t block);

  static constexpr uint64_t kRootKey = 0x243f6a8885a308d3ULL;  // parent key of every chain's first block

  struct KeyEntry {
    bool keyed = false;
    uint64_t key = 0;
    uint64_t parent = 0;  // key of the previous block of the chain, kRootKey at depth 0
    int64_t depth = 0;    // index of the block in every block table holding it
  };

  int64_t block_size_;
  std::vector<int64_t> refcount_;  // [num_blocks]
  // Intrusive free list over block ids; -1 ends it. Only meaningful for blocks whose refcount is 0.
  std::vector<int64_t> prev_;      // [num_blocks]
  std::vector<int64_t> next_;      // [num_blocks]
  int64_t head_ = -1;
  int64_t tail_ = -1;
  int64_t num_free_ = 0;
  std::unordered_map<int64_t, Sequence> seqs_;

  std::vector<KeyEntry> keys_;          // [num_blocks]
  // NOTE: the tokens of every keyed block are kept ([num_blocks * block_size], 8 bytes a slot, small next to the
  // KV they index) so that a hit is verified exactly and a 64-bit hash collision can never serve wrong KV.
  std::vector<int64_t> key_tokens_;
  std::unordered_map<uint64_t, int64_t> cached_;  // key -> block
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
};

}  // namespace rlhf_engine
