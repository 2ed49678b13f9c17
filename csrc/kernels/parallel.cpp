// The persistent thread pool behind parallel_for (parallel.hpp).
//
// Protocol: run_chunks holds run_mu_ for the whole job (try_lock: a second host thread runs its
// job inline instead of waiting). Under mu_ it publishes the job (chunk function, count, claim
// counter), the number of worker tickets (chunks - 1 at most) and a new generation, and wakes the
// workers. A worker that sees a new generation takes a ticket if one is left, claims chunks from
// the shared atomic counter until none is left, and checks out (pending_ - 1). The caller claims
// chunks too; once the counter is exhausted it revokes the tickets not taken yet (a late worker
// would find nothing to do) and waits until every ticket holder has checked out, so the job
// (which lives on the caller's stack) is never touched after run_chunks returns. Workers without
// a ticket go back to sleep.
//
// fork(): the forking thread holds run_mu_ across fork (no job runs while memory is copied); the
// child runs every job inline (the parent's workers do not exist there, and their mutex /
// condition-variable state is not trusted).
#include "kernels/parallel.hpp"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace pyzeroq {
namespace {

thread_local bool t_in_chunk = false;  // set while this thread runs a chunk: nested jobs run inline

class ThreadPool {
 public:
  static ThreadPool& instance() {
    // Never destroyed: joining workers from a static destructor after the interpreter is gone
    // would be fragile; the OS ends them at exit.
    static ThreadPool* pool = new ThreadPool();
    return *pool;
  }

  unsigned threads() const { return threads_.load(std::memory_order_relaxed); }

  void set_threads(unsigned n) {
    const std::lock_guard<std::mutex> job(run_mu_);
    if (n == threads()) return;
    if (!forked_child_) stop_workers();
    threads_.store(n, std::memory_order_relaxed);
  }

  // false when the pool is busy (caller runs the job inline)
  bool try_run(std::size_t chunks, const std::function<void(std::size_t)>& chunk) {
    std::unique_lock<std::mutex> job(run_mu_, std::try_to_lock);
    if (!job.owns_lock() || forked_child_) return false;
    start_workers();
    {
      const std::lock_guard<std::mutex> lock(mu_);
      chunk_ = &chunk;
      chunks_ = chunks;
      next_.store(0, std::memory_order_relaxed);
      error_ = nullptr;
      tickets_ = std::min<std::size_t>(chunks - 1, workers_->size());
      pending_ = tickets_;
      ++generation_;
    }
    work_cv_.notify_all();
    drain();
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lock(mu_);
      pending_ -= tickets_;  // revoke the tickets nobody took: every chunk is claimed already
      tickets_ = 0;
      done_cv_.wait(lock, [this] { return pending_ == 0; });
      chunk_ = nullptr;
      error = error_;
      error_ = nullptr;
    }
    if (error) std::rethrow_exception(error);
    return true;
  }

 private:
  ThreadPool() : threads_(hardware_threads()), workers_(new std::vector<std::thread>()) {
    pthread_atfork([] { instance().before_fork(); }, [] { instance().after_fork_parent(); },
                   [] { instance().after_fork_child(); });
  }

  // Claims chunks until none is left; the first exception is kept for the caller.
  void drain() {
    t_in_chunk = true;
    for (;;) {
      const std::size_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= chunks_) break;
      try {
        (*chunk_)(i);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
    }
    t_in_chunk = false;
  }

  void worker_loop(std::uint64_t seen) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (tickets_ == 0) continue;
      --tickets_;
      lock.unlock();
      drain();
      lock.lock();
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }

  // Caller holds run_mu_. A new worker waits for the generation after the current one.
  void start_workers() {
    const std::size_t want = threads() - 1;
    if (workers_->size() >= want) return;
    std::uint64_t current;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      current = generation_;
    }
    while (workers_->size() < want) workers_->emplace_back([this, current] { worker_loop(current); });
  }

  void stop_workers() {
    {
      const std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& w : *workers_) w.join();
    workers_->clear();
    const std::lock_guard<std::mutex> lock(mu_);
    stop_ = false;
  }

  // The child's copies of the workers' std::thread handles are leaked, never joined.
  void before_fork() { run_mu_.lock(); }
  void after_fork_parent() { run_mu_.unlock(); }
  void after_fork_child() {
    forked_child_ = true;
    workers_ = new std::vector<std::thread>();
    run_mu_.unlock();
  }

  std::atomic<unsigned> threads_;
  std::vector<std::thread>* workers_;
  bool forked_child_ = false;  // written only with run_mu_ held (fork handler)
  std::mutex run_mu_;  // one job at a time; held by set_threads and across fork
  std::mutex mu_;      // the fields below
  std::condition_variable work_cv_, done_cv_;
  const std::function<void(std::size_t)>* chunk_ = nullptr;
  std::size_t chunks_ = 0;
  std::atomic<std::size_t> next_{0};
  std::size_t tickets_ = 0, pending_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace

unsigned hardware_threads() {
  static const unsigned n = [] {
    const unsigned c = std::thread::hardware_concurrency();
    return c == 0 ? 1u : std::min(c, kMaxThreads);
  }();
  return n;
}

unsigned num_threads() { return ThreadPool::instance().threads(); }

void set_num_threads(unsigned n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " +
                                std::to_string(n));
  ThreadPool::instance().set_threads(n);
}

namespace detail {
void run_chunks(std::size_t chunks, const std::function<void(std::size_t)>& chunk) {
  if (chunks > 1 && !t_in_chunk && ThreadPool::instance().try_run(chunks, chunk)) return;
  for (std::size_t i = 0; i < chunks; ++i) chunk(i);
}
}  // namespace detail

}  // namespace pyzeroq
