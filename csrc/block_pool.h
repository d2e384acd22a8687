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
// Ready for prefix caching (a later step): the free list is an intrusive doubly linked list in LRU order
// (allocation pops the head = least recently freed, freeing appends at the tail, and a sequence frees its tail
// blocks first). A hashed full block can then stay in the free list with its contents after its refcount drops
// to 0, be revived in O(1) by unlinking it from the middle on a prefix hit, or be evicted (hash dropped) when it
// reaches the head. The hash map and the per-block hash will sit next to refcount_.

#pragma once

#include <cstdint>
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
  // Drops seq_id; blocks whose refcount reaches 0 return to the free list.
  void free(int64_t seq_id);

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
  // blocks_needed(num_tokens) distinct, in-range blocks. Throws std::logic_error naming the first violation.
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

  int64_t pop_free();              // unlinks and returns the head (least recently freed) block; refcount -> 1
  void push_free(int64_t block);   // links block at the tail
  void release(int64_t block);     // refcount - 1; back to the free list at 0

  int64_t block_size_;
  std::vector<int64_t> refcount_;  // [num_blocks]
  // Intrusive free list over block ids; -1 ends it. Only meaningful for blocks whose refcount is 0.
  std::vector<int64_t> prev_;      // [num_blocks]
  std::vector<int64_t> next_;      // [num_blocks]
  int64_t head_ = -1;
  int64_t tail_ = -1;
  int64_t num_free_ = 0;
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace rlhf_engine
