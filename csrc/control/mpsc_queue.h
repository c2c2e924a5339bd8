// Intrusive lock-free multi-producer single-consumer queue (Vyukov's node-based design).
//
// Invariants:
//   - push() is wait-free: one atomic exchange and one store; any thread may call it.
//   - pop() and looks_empty() are called by one consumer at a time (the caller serialises them).
//   - A node is in at most one queue at a time; after pop() returns it, the queue no longer touches it,
//     so it may be pushed again.
//   - Between a producer's exchange and its link store the queue is momentarily "in progress": pop()
//     returns nullptr although an item exists; looks_empty() returns false. The producer finishes in a
//     bounded number of steps.
#pragma once

#include <atomic>

namespace pie::control {

struct MpscNode {
  std::atomic<MpscNode*> next{nullptr};
};

class MpscQueue {
 public:
  MpscQueue() : head_(&stub_), tail_(&stub_) {}
  MpscQueue(const MpscQueue&) = delete;
  MpscQueue& operator=(const MpscQueue&) = delete;

  void push(MpscNode* node) { push_chain(node, node); }

  // Pushes first..last, already linked through `next` (last's is overwritten): the consumer pops them
  // in order and never sees the first without the others (they enter with one exchange).
  void push_chain(MpscNode* first, MpscNode* last) {
    last->next.store(nullptr, std::memory_order_relaxed);
    MpscNode* previous = head_.exchange(last, std::memory_order_acq_rel);
    previous->next.store(first, std::memory_order_release);
  }

  // The oldest node, or nullptr when empty or when the oldest push is still in progress.
  MpscNode* pop() {
    MpscNode* tail = tail_;
    MpscNode* next = tail->next.load(std::memory_order_acquire);
    if (tail == &stub_) {
      if (next == nullptr) return nullptr;
      tail_ = next;
      tail = next;
      next = next->next.load(std::memory_order_acquire);
    }
    if (next != nullptr) {
      tail_ = next;
      return tail;
    }
    if (tail != head_.load(std::memory_order_acquire)) return nullptr;  // a push is in progress
    push(&stub_);
    next = tail->next.load(std::memory_order_acquire);
    if (next != nullptr) {
      tail_ = next;
      return tail;
    }
    return nullptr;
  }

  // True only when no node is queued and no push is in progress (consumer side).
  bool looks_empty() const {
    return tail_ == &stub_ && stub_.next.load(std::memory_order_acquire) == nullptr &&
           head_.load(std::memory_order_acquire) == &stub_;
  }

 private:
  alignas(64) std::atomic<MpscNode*> head_;  // producers
  alignas(64) MpscNode* tail_;               // consumer
  MpscNode stub_;
};

}  // namespace pie::control
