// Minimal static-partition parallel_for over [0, n) with std::thread.
// Work below `grain` items per thread runs inline (threads cost ~20 us to start).
#pragma once
#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

namespace pyzeroq {

// Read once: hardware_concurrency() parses /sys on every call (~25 us).
inline unsigned hardware_threads() {
  static const unsigned n = [] {
    unsigned c = std::thread::hardware_concurrency();
    return c == 0 ? 1u : c;
  }();
  return n;
}

// fn(begin, end) is called on disjoint chunks covering [0, n).
template <class Fn>
void parallel_for(std::size_t n, std::size_t grain, Fn&& fn) {
  if (n == 0) return;
  std::size_t threads = std::min<std::size_t>(hardware_threads(), (n + grain - 1) / std::max<std::size_t>(grain, 1));
  if (threads <= 1) {
    fn(std::size_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  const std::size_t chunk = (n + threads - 1) / threads;
  for (std::size_t t = 1; t < threads; ++t) {
    const std::size_t begin = t * chunk;
    const std::size_t end = std::min(n, begin + chunk);
    if (begin >= end) break;
    pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(std::size_t{0}, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace pyzeroq
