// One persistent thread pool for every C++ kernel, and parallel_for over it.
//
// Settings (process-wide, the only global state here): the thread count, set_num_threads(n)
// (1 <= n <= kMaxThreads; default: the hardware threads). The pool holds n - 1 workers, started
// on the first job that needs them (never at import); the calling thread works too.
//
// parallel_for(n, grain, fn) calls fn(begin, end) on disjoint contiguous chunks covering [0, n):
// at most num_threads() chunks of at least `grain` items each (the last may be shorter), so a
// job of fewer than 2 * grain items runs on the calling thread, without touching the pool.
// grain_for_cost(c) turns a per-item cost into the grain that gives every chunk at least
// kMinParallelWork elementary operations: the size threshold below which a kernel stays on one
// thread. Chunk boundaries depend on the thread count; every kernel here combines chunk results
// exactly (disjoint outputs, integer or min / max reductions), so results are bit-identical for
// any thread count.
//
// Safe from several host threads: one job runs on the pool at a time; a parallel_for issued
// while the pool is busy (another Python thread, or a nested call inside a chunk) runs inline
// on its caller. An exception thrown by a chunk is rethrown to the caller after all chunks end.
// In a child process after fork() every job runs inline (single thread).
#pragma once
#include <algorithm>
#include <cstddef>
#include <functional>

namespace pyzeroq {

// Elementary operations (an element read and written, a multiply-add) a chunk must hold before
// a job is split: waking the pool and joining costs ~5-20 us, ~2^15 such operations.
constexpr std::size_t kMinParallelWork = std::size_t{1} << 15;
constexpr unsigned kMaxThreads = 256;  // set_num_threads bound (a typo like 10^6 must not spawn threads)

unsigned hardware_threads();  // std::thread::hardware_concurrency(), read once, at least 1
unsigned num_threads();       // the current setting
// 1 <= n <= kMaxThreads (std::invalid_argument otherwise). Waits for a running job to end; the
// workers are restarted lazily at the new count.
void set_num_threads(unsigned n);

constexpr std::size_t grain_for_cost(std::size_t cost_per_item) {
  const std::size_t c = std::max<std::size_t>(cost_per_item, 1);
  return std::max<std::size_t>((kMinParallelWork + c - 1) / c, 1);
}

namespace detail {
// Runs chunk(0) .. chunk(chunks - 1) on the pool and the calling thread; returns after all ended.
// Inline (in order) when the pool is busy, when called from inside a chunk, or for one chunk.
void run_chunks(std::size_t chunks, const std::function<void(std::size_t)>& chunk);
}  // namespace detail

template <class Fn>
void parallel_for(std::size_t n, std::size_t grain, Fn&& fn) {
  if (n == 0) return;
  grain = std::max<std::size_t>(grain, 1);
  std::size_t chunks = std::min<std::size_t>(num_threads(), n / grain);
  if (chunks <= 1) {
    fn(std::size_t{0}, n);
    return;
  }
  const std::size_t step = (n + chunks - 1) / chunks;
  chunks = (n + step - 1) / step;  // no empty chunk
  detail::run_chunks(chunks, [&](std::size_t i) { fn(i * step, std::min(n, (i + 1) * step)); });
}

}  // namespace pyzeroq
