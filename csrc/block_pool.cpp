#include "block_pool.h"

#include <limits>
#include <sstream>
#include <string>
#include <utility>

namespace rlhf_engine {
namespace {

template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}

}  // namespace

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size) : block_size_(block_size) {
  if (num_blocks <= 0) {
    throw std::invalid_argument(cat("BlockPool: num_blocks must be > 0, found ", num_blocks));
  }
  if (block_size <= 0) {
    throw std::invalid_argument(cat("BlockPool: block_size must be > 0, found ", block_size));
  }
  // Slots are block_id * block_size + offset, so every slot must fit in int64.
  if (num_blocks > std::numeric_limits<int64_t>::max() / block_size) {
    throw std::invalid_argument(cat("BlockPool: num_blocks * block_size overflows int64 (num_blocks ", num_blocks,
                                    ", block_size ", block_size, ")"));
  }
  refcount_.assign(num_blocks, 0);
  prev_.assign(num_blocks, -1);
  next_.assign(num_blocks, -1);
  for (int64_t b = 0; b < num_blocks; ++b) push_free(b);
}

// ---- free list ---------------------------------------------------------------------------------------------

int64_t BlockPool::pop_free() {
  const int64_t b = head_;  // callers ran require_free first, so the list is not empty
  head_ = next_[b];
  if (head_ >= 0) {
    prev_[head_] = -1;
  } else {
    tail_ = -1;
  }
  next_[b] = -1;
  refcount_[b] = 1;
  --num_free_;
  return b;
}

void BlockPool::push_free(int64_t block) {
  prev_[block] = tail_;
  next_[block] = -1;
  if (tail_ >= 0) {
    next_[tail_] = block;
  } else {
    head_ = block;
  }
  tail_ = block;
  ++num_free_;
}

void BlockPool::release(int64_t block) {
  if (--refcount_[block] == 0) push_free(block);
}

// ---- argument checks ---------------------------------------------------------------------------------------

const BlockPool::Sequence& BlockPool::find(const char* where, const char* arg, int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw std::invalid_argument(
        cat("BlockPool.", where, ": unknown ", arg, " ", seq_id, " (never allocated, or already freed)"));
  }
  return it->second;
}

BlockPool::Sequence& BlockPool::find(const char* where, const char* arg, int64_t seq_id) {
  return const_cast<Sequence&>(static_cast<const BlockPool*>(this)->find(where, arg, seq_id));
}

void BlockPool::require_new(const char* where, const char* arg, int64_t seq_id) const {
  if (seqs_.count(seq_id) != 0) {
    throw std::invalid_argument(
        cat("BlockPool.", where, ": ", arg, " ", seq_id, " already exists; free it first or pick a new id"));
  }
}

void BlockPool::require_free(const char* where, int64_t needed) const {
  if (needed > num_free_) {
    throw OutOfBlocksError(cat("BlockPool.", where, ": out of KV blocks: need ", needed, ", free ", num_free_, " of ",
                               num_blocks(), "; free finished sequences or raise num_blocks"));
  }
}

int64_t BlockPool::blocks_needed(int64_t num_tokens) const {
  if (num_tokens < 0) {
    throw std::invalid_argument(cat("BlockPool: num_tokens must be >= 0, found ", num_tokens));
  }
  // Written without num_tokens + block_size - 1, which could overflow.
  return num_tokens / block_size_ + (num_tokens % block_size_ != 0 ? 1 : 0);
}

// ---- operations --------------------------------------------------------------------------------------------

const std::vector<int64_t>& BlockPool::allocate(int64_t seq_id, int64_t num_tokens) {
  require_new("allocate", "seq_id", seq_id);
  const int64_t needed = blocks_needed(num_tokens);
  require_free("allocate", needed);
  Sequence seq;
  seq.blocks.reserve(needed);
  for (int64_t i = 0; i < needed; ++i) seq.blocks.push_back(pop_free());
  seq.num_tokens = num_tokens;
  return seqs_.emplace(seq_id, std::move(seq)).first->second.blocks;
}

AppendResult BlockPool::append_slot(int64_t seq_id) {
  Sequence& seq = find("append_slot", "seq_id", seq_id);
  const int64_t offset = seq.num_tokens % block_size_;
  AppendResult result{-1, -1, -1};
  if (offset == 0) {
    // No block yet, or the last one is full: the token starts a new block.
    require_free("append_slot", 1);
    seq.blocks.push_back(pop_free());
  } else if (refcount_[seq.blocks.back()] > 1) {
    // The token goes into a block other sequences still read: give this sequence its own copy.
    require_free("append_slot", 1);
    const int64_t src = seq.blocks.back();
    const int64_t dst = pop_free();
    release(src);  // refcount was > 1, so src stays in use by the others
    seq.blocks.back() = dst;
    result.cow_src = src;
    result.cow_dst = dst;
  }
  result.slot = seq.blocks.back() * block_size_ + offset;
  ++seq.num_tokens;
  return result;
}

void BlockPool::fork(int64_t parent_id, int64_t child_id) {
  const Sequence& parent = find("fork", "parent_id", parent_id);
  require_new("fork", "child_id", child_id);
  for (int64_t b : parent.blocks) ++refcount_[b];
  Sequence child = parent;  // copy before emplace: inserting may rehash and move `parent`
  seqs_.emplace(child_id, std::move(child));
}

void BlockPool::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw std::invalid_argument(
        cat("BlockPool.free: unknown seq_id ", seq_id, " (never allocated, or already freed: double free?)"));
  }
  // Tail blocks first: they are the least shareable, so with prefix caching they should be evicted first.
  const std::vector<int64_t>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) release(*b);
  seqs_.erase(it);
}

// ---- queries -----------------------------------------------------------------------------------------------

bool BlockPool::can_allocate(int64_t num_tokens) const { return blocks_needed(num_tokens) <= num_free_; }

const std::vector<int64_t>& BlockPool::block_table(int64_t seq_id) const {
  return find("block_table", "seq_id", seq_id).blocks;
}

int64_t BlockPool::num_tokens(int64_t seq_id) const { return find("num_tokens", "seq_id", seq_id).num_tokens; }

int64_t BlockPool::refcount(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks()) {
    throw std::invalid_argument(
        cat("BlockPool.refcount: block_id ", block_id, " out of range [0, ", num_blocks(), ")"));
  }
  return refcount_[block_id];
}

std::vector<int64_t> BlockPool::slot_mapping(int64_t seq_id, int64_t start, int64_t end) const {
  const Sequence& seq = find("slot_mapping", "seq_id", seq_id);
  if (start < 0 || start > end || end > seq.num_tokens) {
    throw std::invalid_argument(cat("BlockPool.slot_mapping: need 0 <= start <= end <= num_tokens(", seq_id,
                                    ") = ", seq.num_tokens, ", found start ", start, ", end ", end));
  }
  std::vector<int64_t> slots;
  slots.reserve(end - start);
  for (int64_t t = start; t < end; ++t) {
    slots.push_back(seq.blocks[t / block_size_] * block_size_ + t % block_size_);
  }
  return slots;
}

// ---- invariants --------------------------------------------------------------------------------------------

void BlockPool::check_invariants() const {
  const int64_t n = num_blocks();
  auto fail = [](const std::string& what) { throw std::logic_error("BlockPool.check_invariants: " + what); };

  // References from block tables, counted per block; seen_in marks duplicates inside one table.
  std::vector<int64_t> refs(n, 0);
  std::vector<int64_t> seen_in(n, -1);
  int64_t seq_index = 0;
  for (const auto& [seq_id, seq] : seqs_) {
    if (static_cast<int64_t>(seq.blocks.size()) != blocks_needed(seq.num_tokens)) {
      fail(cat("seq ", seq_id, " has ", seq.blocks.size(), " blocks for ", seq.num_tokens, " tokens, expected ",
               blocks_needed(seq.num_tokens)));
    }
    for (int64_t b : seq.blocks) {
      if (b < 0 || b >= n) fail(cat("seq ", seq_id, " holds block ", b, ", out of range [0, ", n, ")"));
      if (seen_in[b] == seq_index) fail(cat("seq ", seq_id, " holds block ", b, " twice"));
      seen_in[b] = seq_index;
      ++refs[b];
    }
    ++seq_index;
  }
  int64_t zero_refcount = 0;
  for (int64_t b = 0; b < n; ++b) {
    if (refcount_[b] != refs[b]) {
      fail(cat("block ", b, " has refcount ", refcount_[b], " but ", refs[b], " references from block tables"));
    }
    zero_refcount += refcount_[b] == 0;
  }

  // Walk the free list: bounded (no cycle), back-links consistent, only refcount-0 blocks.
  int64_t walked = 0;
  int64_t prev = -1;
  for (int64_t b = head_; b >= 0; b = next_[b]) {
    if (b >= n) fail(cat("free list links to block ", b, ", out of range [0, ", n, ")"));
    if (++walked > n) fail("free list has a cycle");
    if (prev_[b] != prev) fail(cat("free list: block ", b, " links back to ", prev_[b], ", expected ", prev));
    if (refcount_[b] != 0) fail(cat("free list holds block ", b, " with refcount ", refcount_[b]));
    prev = b;
  }
  if (prev != tail_) fail(cat("free list ends at block ", prev, " but tail is ", tail_));
  if (walked != num_free_) fail(cat("free list has ", walked, " blocks but num_free is ", num_free_));
  // walked distinct blocks, all with refcount 0: equality means every refcount-0 block is in the list.
  if (walked != zero_refcount) {
    fail(cat(zero_refcount, " blocks have refcount 0 but the free list holds ", walked));
  }
}

}  // namespace rlhf_engine
