#include "block_pool.h"

#include <algorithm>
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

// splitmix64's finaliser: a bijection of uint64 with full avalanche.
uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
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
  keys_.assign(num_blocks, KeyEntry{});
  key_tokens_.assign(num_blocks * block_size, 0);
  for (int64_t b = 0; b < num_blocks; ++b) push_free(b);
}

// ---- free list ---------------------------------------------------------------------------------------------

int64_t BlockPool::pop_free() {
  const int64_t b = head_;  // callers ran require_free first, so the list is not empty
  unlink_free(b);
  // Evicted: whatever the block cached is about to be overwritten.
  if (keys_[b].keyed) drop_key(b);
  refcount_[b] = 1;
  return b;
}

void BlockPool::unlink_free(int64_t block) {
  const int64_t prev = prev_[block], next = next_[block];
  if (prev >= 0) {
    next_[prev] = next;
  } else {
    head_ = next;
  }
  if (next >= 0) {
    prev_[next] = prev;
  } else {
    tail_ = prev;
  }
  prev_[block] = next_[block] = -1;
  --num_free_;
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

// ---- prefix cache ------------------------------------------------------------------------------------------

uint64_t BlockPool::chain_key(uint64_t parent, const int64_t* tokens) const {
  uint64_t h = mix64(parent ^ 0x9e3779b97f4a7c15ULL);
  for (int64_t t = 0; t < block_size_; ++t) h = mix64(h ^ static_cast<uint64_t>(tokens[t]));
  return h;
}

int64_t BlockPool::lookup(uint64_t key, uint64_t parent, int64_t depth, const int64_t* tokens) const {
  const auto it = cached_.find(key);
  if (it == cached_.end()) return -1;
  const int64_t b = it->second;
  const KeyEntry& entry = keys_[b];
  const int64_t* stored = key_tokens_.data() + b * block_size_;
  const bool same = entry.parent == parent && entry.depth == depth && std::equal(tokens, tokens + block_size_, stored);
  return same ? b : -1;  // a different block under the same key is a hash collision: a miss
}

void BlockPool::drop_key(int64_t block) {
  cached_.erase(keys_[block].key);
  keys_[block] = KeyEntry{};
}

int64_t BlockPool::allocate_prompt(int64_t seq_id, const std::vector<int64_t>& token_ids) {
  require_new("allocate_prompt", "seq_id", seq_id);
  const int64_t num_tokens = static_cast<int64_t>(token_ids.size());
  const int64_t total = blocks_needed(num_tokens);
  // The block holding the last token is never reused, so at least one token is left to prefill (it gives the
  // logits of the first sampled token) and the prefill never writes into a shared block.
  const int64_t matchable = num_tokens > 0 ? (num_tokens - 1) / block_size_ : 0;
  const int64_t* tokens = token_ids.data();

  // Look up the leading run of cached blocks without changing anything, so that running out of blocks below
  // leaves the pool as it was.
  Sequence seq;
  seq.blocks.reserve(total);
  seq.num_tokens = num_tokens;
  uint64_t parent = kRootKey;
  int64_t revived = 0;  // hits sitting in the free list: they stop being free, so fresh blocks cannot use them
  for (int64_t i = 0; i < matchable; ++i) {
    const uint64_t key = chain_key(parent, tokens + i * block_size_);
    const int64_t b = lookup(key, parent, i, tokens + i * block_size_);
    if (b < 0) break;
    seq.blocks.push_back(b);
    revived += refcount_[b] == 0;
    parent = key;
  }
  const int64_t hits = static_cast<int64_t>(seq.blocks.size());
  const int64_t fresh = total - hits;
  if (fresh > num_free_ - revived) {
    throw OutOfBlocksError(cat("BlockPool.allocate_prompt: out of KV blocks: need ", fresh, " (", hits,
                               " of the prompt's ", total, " blocks cached), free ", num_free_ - revived, " of ",
                               num_blocks(), "; free finished sequences or raise num_blocks"));
  }

  for (int64_t b : seq.blocks) {
    if (refcount_[b]++ == 0) unlink_free(b);  // revived: keeps its key and contents
  }
  // Fresh full blocks get keyed for the prefill that follows. A key that is already cached (the prompt's last
  // block when it is full and cached: it is recomputed, see `matchable`) stays with its block; this one, and the
  // rest of the chain after it, stay unkeyed so that keyed blocks always form a leading run.
  bool keying = true;
  for (int64_t i = hits; i < total; ++i) {
    const int64_t b = pop_free();
    seq.blocks.push_back(b);
    if (!keying || (i + 1) * block_size_ > num_tokens) continue;
    const uint64_t key = chain_key(parent, tokens + i * block_size_);
    if (!cached_.emplace(key, b).second) {
      keying = false;
      continue;
    }
    keys_[b] = KeyEntry{true, key, parent, i};
    std::copy_n(tokens + i * block_size_, block_size_, key_tokens_.begin() + b * block_size_);
    parent = key;
  }
  prefix_queries_ += matchable;
  prefix_hits_ += hits;
  seqs_.emplace(seq_id, std::move(seq));
  return hits * block_size_;
}

void BlockPool::reset_prefix_cache() {
  for (const auto& [key, b] : cached_) keys_[b] = KeyEntry{};
  cached_.clear();
}

std::optional<uint64_t> BlockPool::block_key(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks()) {
    throw std::invalid_argument(
        cat("BlockPool.block_key: block_id ", block_id, " out of range [0, ", num_blocks(), ")"));
  }
  if (!keys_[block_id].keyed) return std::nullopt;
  return keys_[block_id].key;
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

  // Prefix cache: the map and the per-block entries agree (counting both ways makes it a bijection), each key is
  // the hash of its block's tokens after its parent, and a chain never loses its parent before its children.
  int64_t keyed = 0;
  for (int64_t b = 0; b < n; ++b) {
    const KeyEntry& e = keys_[b];
    if (!e.keyed) continue;
    ++keyed;
    const auto it = cached_.find(e.key);
    if (it == cached_.end() || it->second != b) {
      fail(cat("block ", b, " is keyed but the key map does not point at it"));
    }
    if (chain_key(e.parent, key_tokens_.data() + b * block_size_) != e.key) {
      fail(cat("block ", b, "'s key is not the hash of its stored tokens and parent key"));
    }
    if (e.depth == 0 ? e.parent != kRootKey : cached_.count(e.parent) == 0) {
      fail(cat("block ", b, " at depth ", e.depth, " has a parent key that is not cached"));
    }
    if (e.depth > 0 && keys_[cached_.at(e.parent)].depth != e.depth - 1) {
      fail(cat("block ", b, " at depth ", e.depth, " has a parent at depth ", keys_[cached_.at(e.parent)].depth));
    }
  }
  if (keyed != static_cast<int64_t>(cached_.size())) {
    fail(cat("the key map has ", cached_.size(), " entries but ", keyed, " blocks are keyed"));
  }
  // A keyed block is full wherever it is held and sits in the keyed leading run at its depth: never written.
  for (const auto& [seq_id, seq] : seqs_) {
    uint64_t parent = kRootKey;
    bool in_run = true;
    for (int64_t i = 0; i < static_cast<int64_t>(seq.blocks.size()); ++i) {
      const KeyEntry& e = keys_[seq.blocks[i]];
      if (!e.keyed) {
        in_run = false;
        continue;
      }
      if (!in_run) fail(cat("seq ", seq_id, " holds keyed block ", seq.blocks[i], " after an unkeyed one"));
      if (e.depth != i || e.parent != parent) {
        fail(cat("seq ", seq_id, " holds keyed block ", seq.blocks[i], " at index ", i, " but it is keyed at depth ",
                 e.depth, (e.parent != parent ? " after another parent" : "")));
      }
      if ((i + 1) * block_size_ > seq.num_tokens) {
        fail(cat("seq ", seq_id, " holds keyed block ", seq.blocks[i], " as its partly filled last block"));
      }
      parent = e.key;
    }
  }
}

}  // namespace rlhf_engine
