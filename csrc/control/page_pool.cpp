#include "page_pool.h"

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <stdexcept>
#include <unordered_set>

#include "errors.h"

namespace pie::control {

PagePool::PagePool(uint32_t num_pages, uint32_t page_size, std::string resource_name)
    : num_pages_(num_pages), page_size_(page_size), resource_name_(std::move(resource_name)) {
  if (num_pages == 0) throw std::invalid_argument("a page pool needs num_pages >= 1");
  if (page_size == 0) throw std::invalid_argument("a page pool needs page_size >= 1");
  refcounts_.assign(num_pages, 0);
  pins_.assign(num_pages, 0);
  page_cached_.assign(num_pages, 0);
  free_pages_.reserve(num_pages);
  for (uint32_t page = num_pages; page-- > 0;) free_pages_.push_back(page);
}

// ---------------------------------------------------------------------------------------------
// Instances

PagePool::Account& PagePool::live_instance_locked(uint64_t instance_id) {
  return const_cast<Account&>(static_cast<const PagePool*>(this)->live_instance_locked(instance_id));
}

const PagePool::Account& PagePool::live_instance_locked(uint64_t instance_id) const {
  auto found = instances_.find(instance_id);
  if (found == instances_.end()) {
    throw InvalidHandle(prefix(instance_id) + "not registered with the " + resource_name_ + " pool");
  }
  if (found->second.terminated) throw InstanceTerminated(found->second.termination_message);
  return found->second;
}

void PagePool::add_instance(uint64_t instance_id, uint32_t quota, uint64_t client, uint32_t client_quota,
                            uint64_t cache_scope) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (instances_.count(instance_id) != 0) {
    throw std::invalid_argument(prefix(instance_id) + "already registered with the " + resource_name_ + " pool");
  }
  Account& instance = instances_[instance_id];
  instance.id = instance_id;
  instance.age = next_age_++;
  instance.quota = quota;
  instance.client = client;
  instance.cache_scope = cache_scope;
  live_by_age_.emplace(instance.age, instance_id);
  if (client != 0) {
    Client& c = clients_[client];
    c.quota = client_quota;
    ++c.num_instances;
  }
}

void PagePool::forget_client_if_unused_locked(uint64_t client) {
  auto found = clients_.find(client);
  if (found != clients_.end() && found->second.num_instances == 0 && found->second.num_exports == 0) {
    clients_.erase(found);
  }
}

void PagePool::set_export_idle_s(double seconds) {
  if (!(seconds >= 0)) throw std::invalid_argument("export_idle_s must be >= 0 (0: never idle)");
  std::lock_guard<std::mutex> lock(mutex_);
  export_idle_ = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

void PagePool::count_handles_locked(const Account& instance, int64_t delta) {
  if (instance.client != 0) clients_.at(instance.client).num_handles += static_cast<uint32_t>(delta);
}

bool PagePool::has_instance(uint64_t instance_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return instances_.count(instance_id) != 0;
}

void PagePool::unref_locked(uint32_t page) {
  if (--refcounts_[page] == 0 && pins_[page] == 0) free_pages_.push_back(page);
}

namespace {
struct PinnedPages {
  std::shared_ptr<PagePool> pool;
  std::vector<uint32_t> pages;
};
}  // namespace

PagePins PagePool::pin_locked(std::vector<uint32_t> pages) {
  for (uint32_t page : pages) ++pins_[page];
  auto* pinned = new PinnedPages{shared_from_this(), std::move(pages)};
  return PagePins(pinned, [](void* p) {
    auto* pinned = static_cast<PinnedPages*>(p);
    pinned->pool->unpin(pinned->pages);
    delete pinned;
  });
}

void PagePool::unpin(const std::vector<uint32_t>& pages) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (uint32_t page : pages) {
    if (--pins_[page] == 0 && refcounts_[page] == 0) free_pages_.push_back(page);
  }
}

uint32_t PagePool::take_free_page_locked() {
  const uint32_t page = free_pages_.back();
  free_pages_.pop_back();
  refcounts_[page] = 1;
  return page;
}

void PagePool::release_all_locked(Account& instance) {
  for (const auto& entry : instance.page_of_handle) unref_locked(entry.second);
  count_handles_locked(instance, -static_cast<int64_t>(instance.page_of_handle.size()));
  instance.page_of_handle.clear();
  ++instance.mapping_epoch;
  const std::vector<ExportKey> owned = std::move(instance.owned_exports);
  instance.owned_exports.clear();
  for (const ExportKey& key : owned) {
    auto found = exports_.find(key);
    if (found == exports_.end()) continue;
    found->second.owner_alive = false;  // persistent: stays, charged to its client only
    if (!found->second.persistent) drop_export_locked(found);
  }
  instance.num_export_pages = 0;
}

uint32_t PagePool::end_instance(uint64_t instance_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = instances_.find(instance_id);
  if (found == instances_.end()) {
    throw InvalidHandle(prefix(instance_id) + "not registered with the " + resource_name_ + " pool");
  }
  Account& instance = found->second;
  const uint32_t num_released = static_cast<uint32_t>(instance.page_of_handle.size());
  release_all_locked(instance);
  if (!instance.terminated) live_by_age_.erase(instance.age);
  const uint64_t client = instance.client;
  instances_.erase(found);
  if (client != 0) {
    --clients_.at(client).num_instances;
    forget_client_if_unused_locked(client);
  }
  return num_released;
}

void PagePool::terminate_locked(Account& instance, const std::string& message,
                                std::vector<Termination>& terminations) {
  release_all_locked(instance);
  instance.terminated = true;
  instance.termination_message = message;
  live_by_age_.erase(instance.age);
  ++num_terminations_;
  terminations.push_back({instance.id, message});
}

void PagePool::terminate(uint64_t instance_id, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  std::vector<Termination> ignored;
  terminate_locked(instance, "instance " + std::to_string(instance_id) + " terminated: " + reason, ignored);
}

// ---------------------------------------------------------------------------------------------
// Handles

std::vector<uint32_t> PagePool::pages_of_locked(const Account& instance, const std::vector<uint32_t>& handles) const {
  std::vector<uint32_t> pages;
  append_pages_locked(instance, handles.data(), handles.size(), pages);
  return pages;
}

void PagePool::append_pages_locked(const Account& instance, const uint32_t* handles, size_t count,
                                   std::vector<uint32_t>& pages) const {
  const size_t before = pages.size();
  pages.reserve(before + count);
  for (size_t i = 0; i < count; ++i) {
    auto found = instance.page_of_handle.find(handles[i]);
    if (found == instance.page_of_handle.end()) {
      pages.resize(before);
      throw InvalidHandle(prefix(instance.id) + resource_name_ + " handle " + std::to_string(handles[i]) +
                          " is not held by this instance");
    }
    pages.push_back(found->second);
  }
}

void PagePool::check_quota_locked(const Account& instance, size_t more) const {
  // "holds H" or "holds H and exports E": the export part only where exports count.
  auto holdings = [](size_t handles, size_t export_pages) {
    return std::to_string(handles) + (export_pages ? " and exports " + std::to_string(export_pages) : "");
  };
  const size_t held = instance.page_of_handle.size() + instance.num_export_pages;
  if (instance.quota != 0 && held + more > instance.quota) {
    throw QuotaExceeded(prefix(instance.id) + "quota of " + std::to_string(instance.quota) + " " + plural() +
                        " exceeded (holds " + holdings(instance.page_of_handle.size(), instance.num_export_pages) +
                        ", asked for " + std::to_string(more) + " more)");
  }
  if (instance.client == 0) return;
  const Client& client = clients_.at(instance.client);
  if (client.quota != 0 && size_t{client.num_handles} + client.num_export_pages + more > client.quota) {
    throw QuotaExceeded(prefix(instance.id) + "its client's quota of " + std::to_string(client.quota) + " " +
                        plural() + " exceeded (its " + std::to_string(client.num_instances) + " instances hold " +
                        holdings(client.num_handles, client.num_export_pages) + ", asked for " +
                        std::to_string(more) + " more)");
  }
}

std::vector<uint32_t> PagePool::share_pages_locked(Account& instance, const std::vector<uint32_t>& pages) {
  std::vector<uint32_t> handles;
  handles.reserve(pages.size());
  for (uint32_t page : pages) {
    const uint32_t handle = instance.next_handle++;
    instance.page_of_handle.emplace(handle, page);
    ++refcounts_[page];
    handles.push_back(handle);
  }
  count_handles_locked(instance, static_cast<int64_t>(handles.size()));
  return handles;
}

size_t PagePool::quota_room_locked(const Account& instance) const {
  size_t room = SIZE_MAX;
  const size_t held = instance.page_of_handle.size() + instance.num_export_pages;
  if (instance.quota != 0) room = instance.quota > held ? instance.quota - held : 0;
  if (instance.client != 0) {
    const Client& client = clients_.at(instance.client);
    const size_t client_held = size_t{client.num_handles} + client.num_export_pages;
    if (client.quota != 0) room = std::min(room, client.quota > client_held ? client.quota - client_held : 0);
  }
  return room;
}

uint32_t PagePool::evict_cache_locked(uint32_t needed) {
  uint32_t freed = 0;
  for (auto it = cache_lru_.end(); it != cache_lru_.begin() && freed < needed;) {
    --it;
    if (refcounts_[it->page] != 1 || pins_[it->page] != 0) continue;  // dropping it frees nothing now
    ++freed;
    ++num_cache_evictions_;
    it = drop_cache_entry_locked(it);
  }
  return freed;
}

std::list<PagePool::CacheEntry>::iterator PagePool::drop_cache_entry_locked(std::list<CacheEntry>::iterator entry) {
  page_cached_[entry->page] = 0;
  unref_locked(entry->page);
  cache_.erase({entry->scope, entry->key});
  return cache_lru_.erase(entry);
}

void PagePool::touch_cache_locked(uint64_t scope, const std::vector<std::string>& keys, size_t count) {
  for (size_t i = count; i-- > 0;) {
    auto found = cache_.find({scope, keys[i]});
    if (found != cache_.end()) cache_lru_.splice(cache_lru_.begin(), cache_lru_, found->second);
  }
}

std::vector<uint32_t> PagePool::cache_lookup(uint64_t instance_id, const std::vector<std::string>& keys) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  if (instance.cache_scope == 0) return {};
  const size_t room = quota_room_locked(instance);
  std::vector<uint32_t> pages;
  for (const std::string& key : keys) {
    if (pages.size() >= room) break;
    auto found = cache_.find({instance.cache_scope, key});
    if (found == cache_.end()) break;
    pages.push_back(found->second->page);
  }
  touch_cache_locked(instance.cache_scope, keys, pages.size());
  num_cache_hits_ += pages.size();
  return share_pages_locked(instance, pages);
}

uint32_t PagePool::cache_store(uint64_t instance_id, const std::vector<std::string>& keys,
                               const std::vector<uint32_t>& handles) {
  if (keys.size() != handles.size()) {
    throw std::invalid_argument("cache_store: " + std::to_string(keys.size()) + " keys for " +
                                std::to_string(handles.size()) + " pages");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const Account& instance = live_instance_locked(instance_id);
  const std::vector<uint32_t> pages = pages_of_locked(instance, handles);  // validates all first
  if (instance.cache_scope == 0) return 0;
  uint32_t added = 0;
  for (size_t i = keys.size(); i-- > 0;) {  // the last first: keys[0] ends the most recently used
    auto found = cache_.find({instance.cache_scope, keys[i]});
    if (found != cache_.end()) {
      cache_lru_.splice(cache_lru_.begin(), cache_lru_, found->second);
      continue;
    }
    if (page_cached_[pages[i]]) continue;  // filed under another key already: one entry per page at most
    page_cached_[pages[i]] = 1;
    cache_lru_.push_front(CacheEntry{instance.cache_scope, keys[i], pages[i]});
    cache_.emplace(std::make_pair(instance.cache_scope, keys[i]), cache_lru_.begin());
    ++refcounts_[pages[i]];
    ++added;
  }
  return added;
}

uint32_t PagePool::cache_clear(std::optional<uint64_t> scope) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint32_t dropped = 0;
  for (auto it = cache_lru_.begin(); it != cache_lru_.end();) {
    if (scope && it->scope != *scope) {
      ++it;
      continue;
    }
    it = drop_cache_entry_locked(it);
    ++dropped;
  }
  return dropped;
}

void PagePool::reserve_pages_locked(Account& requester, uint32_t count, std::vector<Termination>& terminations) {
  if (free_pages_.size() >= count) return;
  evict_cache_locked(count - static_cast<uint32_t>(free_pages_.size()));  // a cache is always safe to drop
  if (free_pages_.size() >= count) return;
  const uint32_t needed = count - static_cast<uint32_t>(free_pages_.size());
  const std::string shortage = "the " + resource_name_ + " pool is exhausted (instance " +
                               std::to_string(requester.id) + " needed " + std::to_string(count) + " " + plural() +
                               ", " + std::to_string(free_pages_.size()) + " free of " + std::to_string(num_pages_) +
                               ")";
  // Simulate dropping evictable exports, least recently used first, then terminating newer instances,
  // newest first, until enough pages would come free.
  std::unordered_map<uint32_t, uint32_t> num_dropped;  // page -> references the evictions and victims hold
  uint32_t num_freed = 0;
  auto drop = [&](uint32_t page) {  // a pinned page comes free only when its command is done
    if (++num_dropped[page] == refcounts_[page] && pins_[page] == 0) ++num_freed;
  };
  std::vector<std::map<ExportKey, Export>::iterator> evicted;
  {
    const Clock::time_point now = Clock::now();
    for (auto it = exports_.begin(); it != exports_.end(); ++it) {
      if (evictable_locked(it->second, now)) evicted.push_back(it);
    }
    std::sort(evicted.begin(), evicted.end(),
              [](const auto& a, const auto& b) { return a->second.last_used < b->second.last_used; });
    size_t num_evicted = 0;
    while (num_evicted < evicted.size() && num_freed < needed) {
      for (uint32_t page : evicted[num_evicted]->second.pages) drop(page);
      ++num_evicted;
    }
    evicted.resize(num_evicted);
  }
  auto is_evicted = [&](const ExportKey& key) {
    return std::any_of(evicted.begin(), evicted.end(), [&](const auto& it) { return it->first == key; });
  };
  std::vector<Account*> victims;
  for (auto it = live_by_age_.rbegin(); it != live_by_age_.rend() && it->first > requester.age && num_freed < needed;
       ++it) {
    Account& victim = instances_.at(it->second);
    victims.push_back(&victim);
    for (const auto& entry : victim.page_of_handle) drop(entry.second);
    for (const ExportKey& key : victim.owned_exports) {
      const Export& exported = exports_.at(key);
      if (!exported.persistent && !is_evicted(key)) {
        for (uint32_t page : exported.pages) drop(page);
      }
    }
  }
  if (num_freed < needed) {
    const std::string message = "instance " + std::to_string(requester.id) + " terminated: " + shortage +
                                "; no newer instance holds enough to free";
    terminate_locked(requester, message, terminations);
    throw InstanceTerminated(message);
  }
  for (auto it : evicted) {
    drop_export_locked(it);
    ++num_evictions_;
  }
  for (Account* victim : victims) {
    terminate_locked(*victim,
                     "instance " + std::to_string(victim->id) + " terminated: " + shortage +
                         "; the newest instance is terminated first",
                     terminations);
  }
}

std::vector<uint32_t> PagePool::allocate(uint64_t instance_id, uint32_t count, std::vector<Termination>& terminations) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  if (count > num_pages_) {
    throw std::invalid_argument(prefix(instance_id) + "asked for " + std::to_string(count) + " " + plural() +
                                ", more than the pool's " + std::to_string(num_pages_));
  }
  check_quota_locked(instance, count);
  reserve_pages_locked(instance, count, terminations);
  std::vector<uint32_t> handles;
  handles.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    const uint32_t handle = instance.next_handle++;
    instance.page_of_handle.emplace(handle, take_free_page_locked());
    handles.push_back(handle);
  }
  count_handles_locked(instance, count);
  return handles;
}

namespace {

void check_distinct(uint64_t instance_id, const std::string& resource_name, const std::vector<uint32_t>& handles) {
  std::unordered_set<uint32_t> seen;
  seen.reserve(handles.size());
  for (uint32_t handle : handles) {
    if (!seen.insert(handle).second) {
      throw std::invalid_argument("instance " + std::to_string(instance_id) + ": " + resource_name + " handle " +
                                  std::to_string(handle) + " is listed twice");
    }
  }
}

}  // namespace

void PagePool::free(uint64_t instance_id, const std::vector<uint32_t>& handles) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  check_distinct(instance_id, resource_name_, handles);
  pages_of_locked(instance, handles);  // validates all before changing anything
  for (uint32_t handle : handles) {
    auto found = instance.page_of_handle.find(handle);
    unref_locked(found->second);
    instance.page_of_handle.erase(found);
  }
  ++instance.mapping_epoch;
  count_handles_locked(instance, -static_cast<int64_t>(handles.size()));
}

std::vector<uint32_t> PagePool::resolve(uint64_t instance_id, const std::vector<uint32_t>& handles) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return pages_of_locked(live_instance_locked(instance_id), handles);
}

std::vector<uint32_t> PagePool::resolve_pinned(uint64_t instance_id, const std::vector<uint32_t>& handles,
                                               PagePins& pins) {
  PagePins pinned;
  std::vector<uint32_t> pages;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pages = pages_of_locked(live_instance_locked(instance_id), handles);
    pinned = pin_locked(pages);
  }
  pins.swap(pinned);  // pins it held before are released here, outside the lock (unpin takes it)
  return pages;
}

bool PagePool::resolve_more(uint64_t instance_id, const std::vector<uint32_t>& handles, size_t count,
                            uint64_t& epoch, std::vector<uint32_t>& pages, PagePins& pins, size_t written_from,
                            bool* written_shared) {
  if (count > handles.size()) throw std::invalid_argument("resolve_more: count past the handles");
  PagePins pinned;
  bool all;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const Account& instance = live_instance_locked(instance_id);
    all = instance.mapping_epoch != epoch || pages.size() > count;
    if (all) {
      std::vector<uint32_t> fresh;
      append_pages_locked(instance, handles.data(), count, fresh);
      if (!fresh.empty()) pinned = pin_locked(fresh);
      pages = std::move(fresh);
      epoch = instance.mapping_epoch;
    } else if (pages.size() < count) {
      const size_t from = pages.size();
      append_pages_locked(instance, handles.data() + from, count - from, pages);
      pinned = pin_locked(std::vector<uint32_t>(pages.begin() + static_cast<std::ptrdiff_t>(from), pages.end()));
    }
    if (written_shared != nullptr) {
      *written_shared = false;
      for (size_t i = written_from; i < count; ++i) *written_shared = *written_shared || refcounts_[pages[i]] > 1;
    }
  }
  pins.swap(pinned);  // pins it held before are released here, outside the lock
  return all;
}

std::vector<PageCopy> PagePool::prepare_write(uint64_t instance_id, const std::vector<uint32_t>& handles,
                                              std::vector<Termination>& terminations, PagePins* pins) {
  PagePins pinned;
  std::vector<PageCopy> copies = split_shared_pages(instance_id, handles, terminations, pins ? &pinned : nullptr);
  if (pins != nullptr) pins->swap(pinned);  // pins it held before are released here, outside the lock
  return copies;
}

std::vector<PageCopy> PagePool::split_shared_pages(uint64_t instance_id, const std::vector<uint32_t>& handles,
                                                     std::vector<Termination>& terminations, PagePins* pins) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  check_distinct(instance_id, resource_name_, handles);
  const std::vector<uint32_t> pages = pages_of_locked(instance, handles);
  if (std::all_of(pages.begin(), pages.end(), [this](uint32_t page) { return refcounts_[page] <= 1; })) return {};
  // A page held k times in `handles` and r times in all needs min(k, r - 1) copies: each copy
  // drops its refcount by one, and the last holder writes in place.
  std::unordered_map<uint32_t, uint32_t> times_listed;
  for (uint32_t page : pages) ++times_listed[page];
  uint32_t num_copies = 0;
  for (const auto& entry : times_listed) num_copies += std::min(entry.second, refcounts_[entry.first] - 1);
  if (num_copies == 0) return {};
  reserve_pages_locked(instance, num_copies, terminations);
  std::vector<PageCopy> copies;
  copies.reserve(num_copies);
  for (size_t i = 0; i < handles.size(); ++i) {
    const uint32_t page = pages[i];
    if (refcounts_[page] <= 1) continue;
    const uint32_t copy = take_free_page_locked();
    --refcounts_[page];  // stays >= 1: another holder keeps it
    instance.page_of_handle[handles[i]] = copy;
    copies.push_back({page, copy});
  }
  ++instance.mapping_epoch;
  if (pins != nullptr) {
    std::vector<uint32_t> pinned;
    pinned.reserve(2 * copies.size());
    for (const PageCopy& c : copies) pinned.insert(pinned.end(), {c.src_page, c.dst_page});
    *pins = pin_locked(std::move(pinned));
  }
  return copies;
}

std::vector<uint32_t> PagePool::fork(uint64_t instance_id, const std::vector<uint32_t>& handles) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  const std::vector<uint32_t> pages = pages_of_locked(instance, handles);
  check_quota_locked(instance, pages.size());
  return share_pages_locked(instance, pages);
}

// ---------------------------------------------------------------------------------------------
// Exports

std::map<PagePool::ExportKey, PagePool::Export>::iterator PagePool::visible_export_locked(uint64_t client,
                                                                                       const std::string& name) {
  auto found = exports_.find({client, name});
  return found != exports_.end() ? found : exports_.find({kSharedScope, name});
}

void PagePool::uncharge_client_locked(Export& exported) {
  if (!exported.client_alive) return;
  exported.client_alive = false;
  if (exported.client == 0) return;
  Client& client = clients_.at(exported.client);
  --client.num_exports;
  client.num_export_pages -= static_cast<uint32_t>(exported.pages.size());
}

void PagePool::drop_export_locked(std::map<ExportKey, Export>::iterator found) {
  Export& exported = found->second;
  if (exported.owner_alive) {
    Account& owner = instances_.at(exported.owner);
    auto& owned = owner.owned_exports;
    owned.erase(std::remove(owned.begin(), owned.end(), found->first), owned.end());
    owner.num_export_pages -= static_cast<uint32_t>(exported.pages.size());
  }
  const uint64_t client = exported.client;
  uncharge_client_locked(exported);
  for (uint32_t page : exported.pages) unref_locked(page);
  exports_.erase(found);
  if (client != 0) forget_client_if_unused_locked(client);
}

bool PagePool::evictable_locked(const Export& exported, Clock::time_point now) const {
  if (!exported.client_alive) return true;  // ownerless
  return export_idle_ != Clock::duration::zero() && now - exported.last_used >= export_idle_;
}

void PagePool::export_pages(uint64_t instance_id, const std::string& name, const std::vector<uint32_t>& handles,
                            bool persistent, bool shared) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  if (name.empty()) throw std::invalid_argument(prefix(instance_id) + "an export needs a non-empty name");
  if (visible_export_locked(instance.client, name) != exports_.end() ||
      (shared && exports_.count({kSharedScope, name}) != 0)) {
    throw std::invalid_argument(prefix(instance_id) + "an export named '" + name + "' already exists");
  }
  Export exported;
  exported.owner = instance_id;
  exported.client = instance.client;
  exported.persistent = persistent;
  exported.shared = shared;
  exported.pages = pages_of_locked(instance, handles);
  check_quota_locked(instance, exported.pages.size());
  exported.last_used = Clock::now();
  for (uint32_t page : exported.pages) ++refcounts_[page];
  const ExportKey key{shared ? kSharedScope : instance.client, name};
  instance.owned_exports.push_back(key);
  instance.num_export_pages += static_cast<uint32_t>(exported.pages.size());
  if (instance.client != 0) {
    Client& client = clients_.at(instance.client);
    ++client.num_exports;
    client.num_export_pages += static_cast<uint32_t>(exported.pages.size());
  }
  exports_.emplace(key, std::move(exported));
}

std::vector<uint32_t> PagePool::import_pages(uint64_t instance_id, const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  Account& instance = live_instance_locked(instance_id);
  auto found = visible_export_locked(instance.client, name);
  if (found == exports_.end()) throw InvalidHandle(prefix(instance_id) + "no export named '" + name + "'");
  const std::vector<uint32_t>& pages = found->second.pages;
  check_quota_locked(instance, pages.size());
  found->second.last_used = Clock::now();
  return share_pages_locked(instance, pages);
}

void PagePool::unexport(const std::string& name, std::optional<uint64_t> instance_id, uint64_t client) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (instance_id) client = live_instance_locked(*instance_id).client;
  auto found = visible_export_locked(client, name);
  if (found == exports_.end()) {
    throw InvalidHandle((instance_id ? prefix(*instance_id) : std::string()) + "no export named '" + name + "'");
  }
  const Export& exported = found->second;
  if (instance_id && exported.owner_alive && exported.owner != *instance_id) {
    throw InvalidHandle(prefix(*instance_id) + "export '" + name + "' belongs to instance " +
                        std::to_string(exported.owner));
  }
  if (instance_id && exported.client_alive && exported.client != client) {
    throw InvalidHandle(prefix(*instance_id) + "export '" + name + "' is shared by another client: only its " +
                        "instances may remove it");
  }
  drop_export_locked(found);
}

std::vector<std::string> PagePool::export_names(std::optional<uint64_t> instance_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::string> names;
  names.reserve(exports_.size());
  const uint64_t client = instance_id ? live_instance_locked(*instance_id).client : 0;
  for (const auto& entry : exports_) {
    if (!instance_id || entry.first.first == client || entry.first.first == kSharedScope) {
      names.push_back(entry.first.second);
    }
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

void PagePool::end_client(uint64_t client) {
  if (client == 0) throw std::invalid_argument("client 0 is the local user: it never ends");
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = exports_.begin(); it != exports_.end();) {
    auto next = std::next(it);
    if (it->second.client == client && it->second.client_alive) {
      if (it->second.shared) {
        uncharge_client_locked(it->second);  // ownerless: evictable, importable by the other clients
      } else {
        drop_export_locked(it);  // nobody else can see it
      }
    }
    it = next;
  }
  forget_client_if_unused_locked(client);
}

// ---------------------------------------------------------------------------------------------
// Counters and invariants

uint32_t PagePool::refcount(uint32_t page) const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (page >= num_pages_) {
    throw std::out_of_range(resource_name_ + " " + std::to_string(page) + " is out of range (the pool has " +
                            std::to_string(num_pages_) + ")");
  }
  return refcounts_[page];
}

std::vector<uint32_t> PagePool::handles(uint64_t instance_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Account& instance = live_instance_locked(instance_id);
  std::vector<uint32_t> handles;
  handles.reserve(instance.page_of_handle.size());
  for (const auto& entry : instance.page_of_handle) handles.push_back(entry.first);
  std::sort(handles.begin(), handles.end());
  return handles;
}

PoolStats PagePool::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  PoolStats stats;
  stats.num_pages = num_pages_;
  stats.page_size = page_size_;
  stats.num_free = static_cast<uint32_t>(free_pages_.size());
  stats.num_used = num_pages_ - stats.num_free;
  for (uint32_t count : refcounts_) stats.num_shared += count > 1 ? 1 : 0;
  for (uint32_t count : pins_) stats.num_pinned += count > 0 ? 1 : 0;
  std::unordered_set<uint32_t> exported;
  for (const auto& entry : exports_) exported.insert(entry.second.pages.begin(), entry.second.pages.end());
  stats.num_exported = static_cast<uint32_t>(exported.size());
  stats.num_exports = static_cast<uint32_t>(exports_.size());
  stats.num_terminations = num_terminations_;
  stats.num_evictions = num_evictions_;
  stats.num_cached = static_cast<uint32_t>(cache_lru_.size());
  stats.num_cache_hits = num_cache_hits_;
  stats.num_cache_evictions = num_cache_evictions_;
  const Clock::time_point now = Clock::now();
  for (const auto& entry : exports_) {
    const Export& e = entry.second;
    stats.exports.push_back({entry.first.second, e.client, e.owner, e.owner_alive, e.client_alive, e.shared,
                             e.persistent, static_cast<uint32_t>(e.pages.size()),
                             std::chrono::duration<double>(now - e.last_used).count()});
  }
  for (const auto& entry : instances_) {
    const Account& instance = entry.second;
    stats.instances.push_back({instance.id, static_cast<uint32_t>(instance.page_of_handle.size()), instance.quota,
                               static_cast<uint32_t>(instance.owned_exports.size()), instance.terminated});
  }
  std::sort(stats.instances.begin(), stats.instances.end(),
            [](const InstanceUsage& a, const InstanceUsage& b) { return a.instance_id < b.instance_id; });
  for (const auto& entry : clients_) {
    stats.clients.push_back({entry.first, entry.second.num_handles, entry.second.quota, entry.second.num_instances,
                             entry.second.num_export_pages});
  }
  std::sort(stats.clients.begin(), stats.clients.end(),
            [](const PoolStats::ClientUsage& a, const PoolStats::ClientUsage& b) { return a.client < b.client; });
  return stats;
}

void PagePool::check_invariants() const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto fail = [](const std::string& what) { throw std::logic_error("page pool invariant violated: " + what); };
  std::vector<uint32_t> expected(num_pages_, 0);
  size_t num_live = 0;
  for (const auto& entry : instances_) {
    const Account& instance = entry.second;
    if (instance.terminated) {
      if (!instance.page_of_handle.empty() || !instance.owned_exports.empty()) {
        fail("terminated instance " + std::to_string(instance.id) + " still holds pages or exports");
      }
      continue;
    }
    ++num_live;
    auto aged = live_by_age_.find(instance.age);
    if (aged == live_by_age_.end() || aged->second != instance.id) {
      fail("instance " + std::to_string(instance.id) + " is missing from the age index");
    }
    for (const auto& handle : instance.page_of_handle) {
      if (handle.second >= num_pages_) fail("instance " + std::to_string(instance.id) + " maps to a page out of range");
      if (handle.first >= instance.next_handle) fail("handle beyond next_handle");
      ++expected[handle.second];
    }
    uint32_t export_pages = 0;
    for (const ExportKey& key : instance.owned_exports) {
      auto found = exports_.find(key);
      if (found == exports_.end() || found->second.owner != instance.id || !found->second.owner_alive) {
        fail("instance " + std::to_string(instance.id) + " lists export '" + key.second + "' it does not own");
      }
      export_pages += static_cast<uint32_t>(found->second.pages.size());
    }
    if (export_pages != instance.num_export_pages) {
      fail("instance " + std::to_string(instance.id) + "'s export page count does not match its exports");
    }
  }
  if (num_live != live_by_age_.size()) fail("the age index lists instances that are not live");
  std::unordered_map<uint64_t, Client> clients;  // recomputed: handles, instances, exports, export pages
  for (const auto& entry : instances_) {
    if (entry.second.client == 0) continue;
    Client& c = clients[entry.second.client];
    c.num_handles += static_cast<uint32_t>(entry.second.page_of_handle.size());
    ++c.num_instances;
  }
  for (const auto& entry : exports_) {
    if (entry.second.client == 0 || !entry.second.client_alive) continue;
    Client& c = clients[entry.second.client];
    ++c.num_exports;
    c.num_export_pages += static_cast<uint32_t>(entry.second.pages.size());
  }
  if (clients.size() != clients_.size()) fail("the client index lists clients without instances or exports");
  for (const auto& entry : clients_) {
    auto found = clients.find(entry.first);
    if (found == clients.end() || found->second.num_handles != entry.second.num_handles ||
        found->second.num_instances != entry.second.num_instances ||
        found->second.num_exports != entry.second.num_exports ||
        found->second.num_export_pages != entry.second.num_export_pages) {
      fail("client " + std::to_string(entry.first) + "'s counts do not match its instances and exports");
    }
  }
  for (const auto& entry : exports_) {
    if ((entry.first.first == kSharedScope) != entry.second.shared ||
        (!entry.second.shared && entry.first.first != entry.second.client)) {
      fail("export '" + entry.first.second + "' is filed under the wrong scope");
    }
    if (entry.second.owner_alive) {
      auto owner = instances_.find(entry.second.owner);
      if (owner == instances_.end() || owner->second.terminated) {
        fail("export '" + entry.first.second + "' claims a live owner that is gone");
      }
    } else if (!entry.second.persistent) {
      fail("non-persistent export '" + entry.first.second + "' outlived its owner");
    }
    if (!entry.second.client_alive && !entry.second.shared) {
      fail("private export '" + entry.first.second + "' outlived its client");
    }
    for (uint32_t page : entry.second.pages) ++expected[page];
  }
  if (cache_.size() != cache_lru_.size()) fail("the prefix cache's index and LRU list differ");
  for (const CacheEntry& entry : cache_lru_) {
    auto found = cache_.find({entry.scope, entry.key});
    if (found == cache_.end() || &*found->second != &entry) fail("cache entry '" + entry.key + "' is not indexed");
    if (entry.page >= num_pages_) fail("cache entry '" + entry.key + "' maps to a page out of range");
    if (!page_cached_[entry.page]) fail("cache entry '" + entry.key + "''s page is not marked cached");
    ++expected[entry.page];
  }
  if (static_cast<size_t>(std::count(page_cached_.begin(), page_cached_.end(), 1)) != cache_lru_.size())
    fail("pages marked cached do not match the cache entries (one entry per page)");
  std::vector<uint8_t> on_free_list(num_pages_, 0);
  for (uint32_t page : free_pages_) {
    if (page >= num_pages_ || on_free_list[page]) fail("page " + std::to_string(page) + " is on the free list twice");
    on_free_list[page] = 1;
  }
  for (uint32_t page = 0; page < num_pages_; ++page) {
    if (expected[page] != refcounts_[page]) {
      fail("page " + std::to_string(page) + " has refcount " + std::to_string(refcounts_[page]) + " but " +
           std::to_string(expected[page]) + " holders");
    }
    if ((refcounts_[page] == 0 && pins_[page] == 0) != (on_free_list[page] != 0)) {
      fail("page " + std::to_string(page) + " with refcount " + std::to_string(refcounts_[page]) + " and " +
           std::to_string(pins_[page]) + " pins" + (on_free_list[page] ? " is" : " is not") + " on the free list");
    }
  }
}

}  // namespace pie::control
