// The KV page pool: accounting of physical pages 0..num_pages-1 among instances and named exports.
// It holds no tensors; the engine owns the KV cache these ids index.
//
// Model:
//   - An instance reaches pages only through its handles (small integers, per instance). A handle
//     maps to one physical page; several handles (of one or more instances) and exports may map to
//     the same page.
//   - refcount(page) == number of handles mapping to it + number of exports listing it.
//     A page is free exactly when its refcount is 0, and then it is on the free list once.
//   - Sharing is read-only: prepare_write() gives a handle whose page is shared its own copy first
//     (copy-on-write), and returns the (src, dst) copies the engine must perform before writing.
//     fork() shares every page, so only a partly filled last page, the one both forks append to,
//     is ever copied.
//   - An export holds its pages until unexported, or until its owner ends unless it is persistent.
//   - Exhaustion: when an allocation (or a copy-on-write) cannot be met, the newest instances that
//     are newer than the requester are terminated, newest first, as long as that frees enough; if it
//     cannot, the requester itself is terminated and nothing else is disturbed. Termination releases
//     every handle of the instance (and its non-persistent exports) and leaves a record so that its
//     later calls fail with the termination message until end_instance() removes it.
//   - Quotas count the handles an instance holds (0 = unlimited), and, for the instances of one client
//     (a client id given when they are added), the handles they hold together (its client quota).
//   - Pins: a queued or running command pins the pages it reads or writes (resolve_pinned,
//     prepare_write's copies). A pinned page is not handed out again, even once every handle and
//     export of it is gone (an instance that frees its pages while its pass is in flight, or ends):
//     a page is free exactly when it has no holder and no pin. Pins are not holders: copy-on-write
//     looks at holders only. A pin is released when the last copy of its PagePins is dropped.
// Every call either succeeds whole or changes nothing (terminations excepted: they are reported).
// Thread-safe (one mutex).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace pie::control {

struct PageCopy {
  uint32_t src_page;
  uint32_t dst_page;
};

struct Termination {
  uint64_t instance_id;
  std::string message;
};

struct InstanceUsage {
  uint64_t instance_id = 0;
  uint32_t num_handles = 0;
  uint32_t quota = 0;  // 0 = unlimited
  uint32_t num_exports = 0;
  bool terminated = false;
};

// Pages pinned for a command: dropping the last copy unpins them (the pool outlives its pins).
using PagePins = std::shared_ptr<void>;

struct PoolStats {
  uint32_t num_pages = 0;
  uint32_t page_size = 0;
  uint32_t num_used = 0;      // held or pinned
  uint32_t num_free = 0;      // num_pages - num_used
  uint32_t num_pinned = 0;    // pinned by at least one command
  uint32_t num_exported = 0;  // distinct pages listed by at least one export
  uint32_t num_shared = 0;    // refcount > 1
  uint32_t num_exports = 0;
  uint64_t num_terminations = 0;
  std::vector<InstanceUsage> instances;  // by instance id
  struct ClientUsage {
    uint64_t client = 0;
    uint32_t num_handles = 0;
    uint32_t quota = 0;  // 0 = unlimited
    uint32_t num_instances = 0;
  };
  std::vector<ClientUsage> clients;  // by client id
};

class PagePool : public std::enable_shared_from_this<PagePool> {
 public:
  // Pins need the pool to outlive them: make it with std::make_shared.
  PagePool(uint32_t num_pages, uint32_t page_size, std::string resource_name);

  uint32_t num_pages() const { return num_pages_; }
  uint32_t page_size() const { return page_size_; }
  const std::string& resource_name() const { return resource_name_; }

  // client: the instance's client (0: none); client_quota: the handles its client's instances may hold
  // together (0 = unlimited; the latest given applies).
  void add_instance(uint64_t instance_id, uint32_t quota, uint64_t client = 0, uint32_t client_quota = 0);
  bool has_instance(uint64_t instance_id) const;
  // Releases everything the instance holds (persistent exports stay) and forgets it.
  // Returns the number of handles released.
  uint32_t end_instance(uint64_t instance_id);
  // Releases everything like end_instance but keeps a record: later calls throw InstanceTerminated.
  void terminate(uint64_t instance_id, const std::string& reason);

  // `terminations` receives every instance terminated to satisfy the call (the requester included,
  // in which case InstanceTerminated is thrown after it is filled).
  std::vector<uint32_t> allocate(uint64_t instance_id, uint32_t count, std::vector<Termination>& terminations);
  void free(uint64_t instance_id, const std::vector<uint32_t>& handles);
  std::vector<uint32_t> resolve(uint64_t instance_id, const std::vector<uint32_t>& handles) const;
  // resolve() and a pin of the pages in one step: no termination or free can slip in between.
  std::vector<uint32_t> resolve_pinned(uint64_t instance_id, const std::vector<uint32_t>& handles, PagePins& pins);
  // With `pins`: the copies' source and destination pages are pinned (for the copy command).
  std::vector<PageCopy> prepare_write(uint64_t instance_id, const std::vector<uint32_t>& handles,
                                      std::vector<Termination>& terminations, PagePins* pins = nullptr);
  std::vector<uint32_t> fork(uint64_t instance_id, const std::vector<uint32_t>& handles);

  void export_pages(uint64_t instance_id, const std::string& name, const std::vector<uint32_t>& handles,
                    bool persistent);
  std::vector<uint32_t> import_pages(uint64_t instance_id, const std::string& name);
  // With an instance id, only the owner may unexport while it lives; without one (the system), always.
  void unexport(const std::string& name, std::optional<uint64_t> instance_id);
  std::vector<std::string> export_names() const;

  uint32_t refcount(uint32_t page) const;
  std::vector<uint32_t> handles(uint64_t instance_id) const;  // sorted
  PoolStats stats() const;
  // Recomputes every refcount from the holders and checks the free list; throws std::logic_error
  // describing the first violation.
  void check_invariants() const;

 private:
  struct Account {  // the pool's account of one instance: its handles, quota, exports, termination
    uint64_t id = 0;
    uint64_t age = 0;  // creation order; larger is newer
    uint32_t quota = 0;
    uint64_t client = 0;  // 0: none
    uint32_t next_handle = 0;
    std::unordered_map<uint32_t, uint32_t> page_of_handle;
    std::vector<std::string> owned_exports;
    bool terminated = false;
    std::string termination_message;
  };
  struct Export {
    uint64_t owner = 0;
    bool owner_alive = true;
    bool persistent = false;
    std::vector<uint32_t> pages;
  };

  Account& live_instance_locked(uint64_t instance_id);
  const Account& live_instance_locked(uint64_t instance_id) const;
  std::vector<uint32_t> pages_of_locked(const Account& instance, const std::vector<uint32_t>& handles) const;
  struct Client {
    uint32_t quota = 0;
    uint32_t num_handles = 0;  // held by its live instances
    uint32_t num_instances = 0;
  };
  void check_quota_locked(const Account& instance, size_t more) const;
  void count_handles_locked(const Account& instance, int64_t delta);  // a client's share of a change
  void reserve_pages_locked(Account& requester, uint32_t count, std::vector<Termination>& terminations);
  void release_all_locked(Account& instance);
  void terminate_locked(Account& instance, const std::string& message, std::vector<Termination>& terminations);
  uint32_t take_free_page_locked();
  void unref_locked(uint32_t page);
  // Pins the pages (under the lock); the result unpins them when dropped, which takes the lock: never
  // drop a PagePins while holding it.
  PagePins pin_locked(std::vector<uint32_t> pages);
  void unpin(const std::vector<uint32_t>& pages);
  // prepare_write under the lock, which it takes itself.
  std::vector<PageCopy> split_shared_pages(uint64_t instance_id, const std::vector<uint32_t>& handles,
                                             std::vector<Termination>& terminations, PagePins* pins);
  std::string plural() const { return resource_name_ + "s"; }
  std::string prefix(uint64_t instance_id) const { return "instance " + std::to_string(instance_id) + ": "; }

  const uint32_t num_pages_;
  const uint32_t page_size_;
  const std::string resource_name_;
  mutable std::mutex mutex_;
  std::vector<uint32_t> refcounts_;   // (num_pages,) holders: handles and export listings
  std::vector<uint32_t> pins_;        // (num_pages,) pins of commands; free <=> no holder and no pin
  std::vector<uint32_t> free_pages_;  // stack; the next page handed out is free_pages_.back()
  std::unordered_map<uint64_t, Account> instances_;
  std::unordered_map<uint64_t, Client> clients_;
  std::map<uint64_t, uint64_t> live_by_age_;  // age -> instance id, not terminated
  std::map<std::string, Export> exports_;
  uint64_t next_age_ = 0;
  uint64_t num_terminations_ = 0;
};

}  // namespace pie::control
