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
//   - Exports: an export holds its pages until unexported, or until its owner instance ends unless it is
//     persistent. It has a scope: its client's (only that client's instances import, list and unexport
//     it) or, when shared, every client's. A name is unique among the exports one client sees (its own
//     and the shared ones). An export's pages count toward its owner instance's quota while it lives and
//     toward its client's quota until the client ends (end_client): then its private exports are dropped
//     and its shared ones become ownerless. An export that is ownerless, or has not been imported for
//     export_idle_s (0: never idle), is evictable.
//   - Prefix cache (automatic prefix caching, docs/prefix_caching.md): full pages of computed sequences,
//     each filed under a key that names its whole prefix (the SDK's hash chain over the tokens of every
//     page up to and including it), in a cache scope. An instance uses the scope it was added with (0:
//     none: it finds nothing and stores nothing), so instances of other scopes can neither read nor
//     fill its entries. An entry holds one reference to its page and counts toward no quota. A page is
//     filed under one key at most, so the entries never outnumber the pages.
//   - Exhaustion: when an allocation (or a copy-on-write) cannot be met, prefix cache entries are
//     dropped first, least recently used first (an entry whose page is also held elsewhere frees nothing
//     and is passed over); then evictable exports are dropped,
//     least recently imported first, then the newest instances that are newer than the requester are
//     terminated, newest first, as long as that frees enough; if it cannot, the requester itself is
//     terminated and nothing else is disturbed. Termination releases
//     every handle of the instance (and its non-persistent exports) and leaves a record so that its
//     later calls fail with the termination message until end_instance() removes it.
//   - Quotas count the handles an instance holds and the pages listed by the exports it owns (0 =
//     unlimited), and, for the instances of one client (a client id given when they are added), the
//     handles they hold together plus the pages of the client's exports (its client quota).
//   - Pins: a queued or running command pins the pages it reads or writes (resolve_pinned,
//     prepare_write's copies). A pinned page is not handed out again, even once every handle and
//     export of it is gone (an instance that frees its pages while its pass is in flight, or ends):
//     a page is free exactly when it has no holder and no pin. Pins are not holders: copy-on-write
//     looks at holders only. A pin is released when the last copy of its PagePins is dropped.
// Every call either succeeds whole or changes nothing (terminations excepted: they are reported).
// Thread-safe (one mutex).
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
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

struct ExportInfo {
  std::string name;
  uint64_t client = 0;          // the exporter's client (0: the local user)
  uint64_t owner = 0;           // the exporting instance
  bool owner_alive = true;      // that instance has not ended
  bool client_alive = true;     // that client has not ended (false: ownerless)
  bool shared = false;
  bool persistent = false;
  uint32_t num_pages = 0;
  double idle_s = 0;            // seconds since it was exported or last imported
};

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
  uint64_t num_evictions = 0;  // exports dropped under pressure
  uint32_t num_cached = 0;             // prefix cache entries (one page each)
  uint64_t num_cache_hits = 0;         // pages found by cache_lookup
  uint64_t num_cache_evictions = 0;    // entries dropped under pressure
  std::vector<InstanceUsage> instances;  // by instance id
  std::vector<ExportInfo> exports;       // by (client, name); shared ones by (their client, name) too
  struct ClientUsage {
    uint64_t client = 0;
    uint32_t num_handles = 0;
    uint32_t quota = 0;  // 0 = unlimited
    uint32_t num_instances = 0;
    uint32_t num_export_pages = 0;  // pages listed by its exports (counted toward its quota)
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
  // cache_scope: the prefix cache scope it looks up and stores in (0: none).
  void add_instance(uint64_t instance_id, uint32_t quota, uint64_t client = 0, uint32_t client_quota = 0,
                    uint64_t cache_scope = 0);
  bool has_instance(uint64_t instance_id) const;
  // The client is gone: its private exports are dropped, its shared ones lose their owner (evictable).
  // Its instances, if any still live, keep their handles. Client 0 (the local user) never ends.
  void end_client(uint64_t client);
  // Exports not imported for this long are evictable under pressure (0: never).
  void set_export_idle_s(double seconds);
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
  // For a caller that resolves one growing list of handles step after step (a generation stream):
  // `pages` holds the pages of handles[:pages.size()] as of the instance's mapping `epoch`. When no
  // handle of the instance was freed or moved since (the epoch is unchanged), only handles[pages.size():
  // count] are resolved and appended (O(new)); otherwise all of handles[:count] are, and `epoch` is
  // updated. The pages resolved now are pinned into `pins` (left empty when none were). Returns true
  // when all were resolved again (pins of the earlier ones are then the caller's to drop). Throws as
  // resolve(). With `written_shared`: set to whether any of pages[written_from:count] is shared (held
  // by another handle or an export), that is whether a pass writing there needs prepare_write's copies.
  // Nothing is allocated when no handle is new.
  bool resolve_more(uint64_t instance_id, const std::vector<uint32_t>& handles, size_t count, uint64_t& epoch,
                    std::vector<uint32_t>& pages, PagePins& pins, size_t written_from = 0,
                    bool* written_shared = nullptr);
  // With `pins`: the copies' source and destination pages are pinned (for the copy command).
  std::vector<PageCopy> prepare_write(uint64_t instance_id, const std::vector<uint32_t>& handles,
                                      std::vector<Termination>& terminations, PagePins* pins = nullptr);
  std::vector<uint32_t> fork(uint64_t instance_id, const std::vector<uint32_t>& handles);

  void export_pages(uint64_t instance_id, const std::string& name, const std::vector<uint32_t>& handles,
                    bool persistent, bool shared = false);
  // An export the instance sees: its client's of that name, else a shared one.
  std::vector<uint32_t> import_pages(uint64_t instance_id, const std::string& name);
  // With an instance id: an export it sees, which only its owner may remove while the owner lives, then
  // any instance of the owner's client, then (ownerless) anyone who sees it. Without one (the system):
  // the export `client` sees, always.
  void unexport(const std::string& name, std::optional<uint64_t> instance_id, uint64_t client = 0);
  // With an instance id: the names it sees (sorted, once each); without: every export's name.
  std::vector<std::string> export_names(std::optional<uint64_t> instance_id = std::nullopt) const;

  // Prefix cache. New handles (copy-on-write shared, counted toward the instance's quotas) to the pages of
  // keys[:k], for the largest k whose keys are all in the instance's scope, and at most what its quotas
  // still allow; the entries become the most recently used, keys[0] first. Empty without a scope.
  std::vector<uint32_t> cache_lookup(uint64_t instance_id, const std::vector<std::string>& keys);
  // Files the page of handles[i] under keys[i] (full pages whose K/V is computed); a key already in the
  // scope keeps its page. The entries become the most recently used, keys[0] first. Returns how many
  // were added (0 without a scope).
  uint32_t cache_store(uint64_t instance_id, const std::vector<std::string>& keys, const std::vector<uint32_t>& handles);
  // Drops every entry of the scope (every scope's when nullopt); returns how many.
  uint32_t cache_clear(std::optional<uint64_t> scope = std::nullopt);

  uint32_t refcount(uint32_t page) const;
  std::vector<uint32_t> handles(uint64_t instance_id) const;  // sorted
  PoolStats stats() const;
  // Recomputes every refcount from the holders and checks the free list; throws std::logic_error
  // describing the first violation.
  void check_invariants() const;

 private:
  using Clock = std::chrono::steady_clock;
  // (scope, name): scope is the exporter's client, or kSharedScope for a shared export.
  using ExportKey = std::pair<uint64_t, std::string>;
  static constexpr uint64_t kSharedScope = ~uint64_t{0};
  struct Account {  // the pool's account of one instance: its handles, quota, exports, termination
    uint64_t id = 0;
    uint64_t age = 0;  // creation order; larger is newer
    uint32_t quota = 0;
    uint64_t client = 0;  // 0: none
    uint32_t next_handle = 0;
    std::unordered_map<uint32_t, uint32_t> page_of_handle;
    uint64_t mapping_epoch = 1;  // grows whenever a handle is freed or moved to another page (0: never)
    std::vector<ExportKey> owned_exports;
    uint32_t num_export_pages = 0;  // pages listed by owned_exports
    bool terminated = false;
    std::string termination_message;
    uint64_t cache_scope = 0;  // 0: none
  };
  struct CacheEntry {
    uint64_t scope = 0;
    std::string key;
    uint32_t page = 0;
  };
  struct CacheKeyHash {
    size_t operator()(const std::pair<uint64_t, std::string>& k) const {
      return std::hash<std::string>()(k.second) ^ (std::hash<uint64_t>()(k.first) * 0x9E3779B97F4A7C15ULL);
    }
  };
  struct Export {
    uint64_t owner = 0;         // the exporting instance
    bool owner_alive = true;    // it has not ended
    uint64_t client = 0;        // its client
    bool client_alive = true;   // the client has not ended (client 0 never does)
    bool persistent = false;
    bool shared = false;
    std::vector<uint32_t> pages;
    Clock::time_point last_used;  // exported or last imported (eviction order: oldest first)
  };

  Account& live_instance_locked(uint64_t instance_id);
  const Account& live_instance_locked(uint64_t instance_id) const;
  std::vector<uint32_t> pages_of_locked(const Account& instance, const std::vector<uint32_t>& handles) const;
  // Appends the pages of handles[:count] to `pages`; throws InvalidHandle (before appending any) for a
  // handle the instance does not hold.
  void append_pages_locked(const Account& instance, const uint32_t* handles, size_t count,
                           std::vector<uint32_t>& pages) const;
  struct Client {  // kept while it has instances or exports charged to it
    uint32_t quota = 0;
    uint32_t num_handles = 0;  // held by its live instances
    uint32_t num_instances = 0;
    uint32_t num_exports = 0;       // exports charged to it (client_alive)
    uint32_t num_export_pages = 0;  // their pages
  };
  // The export `client` sees under `name` (its own scope first, then the shared one), or end().
  std::map<ExportKey, Export>::iterator visible_export_locked(uint64_t client, const std::string& name);
  void drop_export_locked(std::map<ExportKey, Export>::iterator found);  // unref, uncharge, forget
  void uncharge_client_locked(Export& exported);
  bool evictable_locked(const Export& exported, Clock::time_point now) const;
  void forget_client_if_unused_locked(uint64_t client);
  void check_quota_locked(const Account& instance, size_t more) const;
  void count_handles_locked(const Account& instance, int64_t delta);  // a client's share of a change
  void reserve_pages_locked(Account& requester, uint32_t count, std::vector<Termination>& terminations);
  void release_all_locked(Account& instance);
  // Forgets the entry and drops its reference; returns the entry after it in the LRU list.
  std::list<CacheEntry>::iterator drop_cache_entry_locked(std::list<CacheEntry>::iterator entry);
  // Drops cache entries, least recently used first, whose pages would come free, until `needed` pages
  // are free or none is left; returns how many pages came free.
  uint32_t evict_cache_locked(uint32_t needed);
  // Moves the entries of keys[:count] to the front of the LRU order, keys[0] ending first.
  void touch_cache_locked(uint64_t scope, const std::vector<std::string>& keys, size_t count);
  // New handles of the instance to `pages` (held elsewhere too: a fork, an import, a cache hit), each page
  // one holder more; quotas are the caller's to check.
  std::vector<uint32_t> share_pages_locked(Account& instance, const std::vector<uint32_t>& pages);
  // How many more handles the instance may hold (its quota and its client's).
  size_t quota_room_locked(const Account& instance) const;
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
  std::map<ExportKey, Export> exports_;
  Clock::duration export_idle_{0};  // 0: exports never become idle
  uint64_t next_age_ = 0;
  uint64_t num_terminations_ = 0;
  uint64_t num_evictions_ = 0;
  // The prefix cache: entries in LRU order (front: most recently used), and by (scope, key).
  std::list<CacheEntry> cache_lru_;
  std::vector<uint8_t> page_cached_;  // (num_pages,) 1: filed under one entry (at most one: entries <= pages)
  std::unordered_map<std::pair<uint64_t, std::string>, std::list<CacheEntry>::iterator, CacheKeyHash> cache_;
  uint64_t num_cache_hits_ = 0;
  uint64_t num_cache_evictions_ = 0;
};

}  // namespace pie::control
