// pybind11 bindings of the kernels' thread pool (private; pyzeroq.set_num_threads /
// get_num_threads are the public API and validate the argument's type first).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "bindings/register.hpp"
#include "kernels/parallel.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace pyzeroq {
namespace {

// Test hook: a parallel_for over `items` items in which every item waits (up to timeout_s) until
// all have started, so each chunk must run on its own thread; returns the hashed thread id that
// ran each item. Shows how many threads a job really gets and that they persist across calls.
std::vector<std::size_t> pool_thread_ids(std::size_t items, double timeout_s) {
  std::vector<std::size_t> ids(items);
  std::mutex mu;
  std::condition_variable cv;
  std::size_t started = 0;
  const auto timeout = std::chrono::duration<double>(timeout_s);
  parallel_for(items, 1, [&](std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) {
      ids[i] = std::hash<std::thread::id>{}(std::this_thread::get_id());
      std::unique_lock<std::mutex> lock(mu);
      ++started;
      cv.notify_all();
      cv.wait_for(lock, timeout, [&] { return started >= items; });
    }
  });
  return ids;
}

}  // namespace

void register_parallel(py::module_& m) {
  m.def("set_num_threads", [](long long n) {
    if (n < 1 || n > static_cast<long long>(kMaxThreads))
      throw py::value_error("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " + std::to_string(n));
    py::gil_scoped_release release;  // may wait for a job running in another thread
    set_num_threads(static_cast<unsigned>(n));
  }, "num_threads"_a, "Threads of every C++ kernel (1 = single-threaded); waits for a running job.");
  m.def("get_num_threads", [] { return num_threads(); }, "Threads of every C++ kernel.");
  m.def("hardware_threads", [] { return hardware_threads(); }, "The default thread count (CPUs, at least 1).");
  m.def("_pool_thread_ids", [](std::size_t items, double timeout_s) {
    py::gil_scoped_release release;
    return pool_thread_ids(items, timeout_s);
  }, "items"_a, "timeout_s"_a, "Test hook: the thread that ran each item of a parallel_for (see parallel.cpp).");
  m.attr("MAX_THREADS") = kMaxThreads;
  m.attr("MIN_PARALLEL_WORK") = kMinParallelWork;
}

}  // namespace pyzeroq
