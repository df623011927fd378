// Work sharing for MAXRec's native CPU kernels (top_k.cc, bpr_step.cc) over XLA's
// intra-op thread pool.
//
// ParallelFor(pool, n, chunk, max_helpers, fn) runs fn(lo, hi) over [0, n) in chunks of
// `chunk`, handed out through an atomic cursor to the calling thread and up to
// `max_helpers` pool tasks. The caller works too and then waits only for chunks already
// taken, so a busy or absent pool costs speed, never a deadlock; a helper that starts
// after the work is done finds no chunk and never calls fn (a reference into the caller's
// frame). An exception thrown by fn (out of memory) is caught in its thread: its chunk
// still counts as done, and ParallelFor returns false. No memory for the bookkeeping, or
// for scheduling a helper: the caller does the rest alone.
#ifndef MAXREC_PARALLEL_H_
#define MAXREC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace maxrec {

template <typename Fn>
bool ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunk, int64_t max_helpers,
                 const Fn& fn) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<bool> failed{false};
  };
  std::shared_ptr<Shared> shared;
  try {
    shared = std::make_shared<Shared>();
  } catch (const std::bad_alloc&) {
    try {
      for (int64_t lo = 0; lo < n; lo += chunk) fn(lo, std::min(n, lo + chunk));
    } catch (...) {
      return false;
    }
    return true;
  }
  auto drain = [shared, n, chunk, fnp = &fn] {
    for (;;) {
      const int64_t lo = shared->next.fetch_add(chunk);
      if (lo >= n) return;
      const int64_t hi = std::min(n, lo + chunk);
      try {
        (*fnp)(lo, hi);
      } catch (...) {
        shared->failed.store(true);
      }
      shared->done.fetch_add(hi - lo, std::memory_order_release);
    }
  };
  const int64_t tasks = (n + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(max_helpers, tasks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    try {
      pool.Schedule(decltype(drain)(drain));
    } catch (const std::bad_alloc&) {  // the caller does the rest
      break;
    }
  }
  drain();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  return !shared->failed.load();
}

}  // namespace maxrec

#endif  // MAXREC_PARALLEL_H_
