// A caching CPU allocator: large freed blocks are kept and handed out again, so each epoch's
// activations land on pages that are already mapped (see bns_pipe/memory.py for why).
//
// cpu_cache_enable(int max_cached_bytes) -> ()
//   Makes this the CPU allocator of the process (once; later calls only change the limit).
//   Requests of at least kMinBlock bytes are served from the cache: the smallest free block
//   of size in [n, n + n/4] (best fit), else a new 64-byte-aligned block of exactly n bytes.
//   A freed block goes back to the cache; while the cache holds more than max_cached_bytes,
//   its largest free blocks are released to the system. Smaller requests go to PyTorch's
//   default CPU allocator, as before. Tensors allocated before the switch keep their own
//   deleter.
// cpu_cache_stats() -> int[]
//   [cached free bytes, blocks handed out from the cache, blocks newly allocated, blocks
//   released].
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace bns_pipe {
namespace {

constexpr size_t kMinBlock = size_t(1) << 20;

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBlock) return c10::GetDefaultCPUAllocator()->allocate(n);
    void* ptr = take(n);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void set_limit(int64_t limit) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = static_cast<size_t>(std::max<int64_t>(0, limit));
    trim();
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), hits_, misses_, released_};
  }

  static CachingCpuAllocator& instance() {
    static auto* allocator = new CachingCpuAllocator();  // never destroyed: tensors may
    return *allocator;                                   // be freed after static teardown
  }

 private:
  void* take(size_t n) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(n);
      if (it != free_.end() && it->first <= n + n / 4) {
        void* ptr = it->second;
        cached_ -= it->first;
        free_.erase(it);
        ++hits_;
        return ptr;
      }
      ++misses_;
    }
    void* ptr = nullptr;
    const int err = posix_memalign(&ptr, c10::gAlignment, n);
    TORCH_CHECK(err == 0 && ptr != nullptr, "bns_pipe CPU cache: out of memory allocating ",
                n, " bytes");
    std::lock_guard<std::mutex> lock(mutex_);
    size_of_[ptr] = n;
    return ptr;
  }

  static void release(void* ptr) { instance().give_back(ptr); }

  void give_back(void* ptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t n = size_of_.at(ptr);
    free_.emplace(n, ptr);
    cached_ += n;
    trim();
  }

  // Releases the largest free blocks while the cache is over its limit (mutex held).
  void trim() {
    while (cached_ > limit_ && !free_.empty()) {
      auto largest = std::prev(free_.end());
      cached_ -= largest->first;
      size_of_.erase(largest->second);
      std::free(largest->second);
      free_.erase(largest);
      ++released_;
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;           // size → free block
  std::unordered_map<void*, size_t> size_of_;   // every block of this allocator
  size_t cached_ = 0, limit_ = 0;
  int64_t hits_ = 0, misses_ = 0, released_ = 0;
};

void cpu_cache_enable(int64_t max_cached_bytes) {
  TORCH_CHECK(max_cached_bytes >= 0, "cpu_cache_enable: the limit must be >= 0");
  static std::once_flag installed;
  auto& allocator = CachingCpuAllocator::instance();
  allocator.set_limit(max_cached_bytes);
  std::call_once(installed, [&] { c10::SetCPUAllocator(&allocator, /*priority=*/1); });
}

std::vector<int64_t> cpu_cache_stats() { return CachingCpuAllocator::instance().stats(); }

}  // namespace
}  // namespace bns_pipe

TORCH_LIBRARY_FRAGMENT(bns_pipe, m) {
  m.def("cpu_cache_enable(int max_cached_bytes) -> ()", &bns_pipe::cpu_cache_enable);
  m.def("cpu_cache_stats() -> int[]", &bns_pipe::cpu_cache_stats);
}
