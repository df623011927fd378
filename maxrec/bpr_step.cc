// One row-sparse MF-BPR training step on the CPU, as an XLA FFI handler.
//
// The fused form of `maxrec/sparse.py`'s `sparse_mf_step` (lazy Adam) and
// `sparse_sgd_step` (SGD), which stay the specification: the tests check this kernel
// against them. XLA's CPU runtime spends 1.1-1.7 ms on a 2048-triple lazy-Adam step as a
// dozen single-threaded gather, scatter and elementwise passes over [3B, d] intermediates;
// here the step is three passes over the batch's rows (BUILD_NOTES, "Performance"):
//   1. per triple (u, i, j): the scores, the loss terms and the gradient of the three
//      rows, from the table's θ (shared out over XLA's intra-op thread pool);
//   2. repeated rows: every occurrence p of a row writes p into an int32 scratch table
//      indexed by row and reads back one representative, which sums the gradients of all
//      occurrences in p's order (no sort, and the scratch needs no clearing);
//   3. per distinct row: the optimizer update, in place (thread pool again).
// A step whose loss is not finite writes nothing, as in the JAX step.
//
// Table layout: row r of a [n, w] float32 table is θ_r (w = d, SGD) or (θ_r, m_r, v_r)
// (w = 3d, lazy Adam), users first, then items. The update of a touched row:
//   SGD:  θ <- θ - lr g
//   Adam: m <- b1 m + c1 g ; v <- b2 v + c2 g²  (c = 1 - b, rounded from double) ;
//         θ <- θ - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)      (optax.adam)
// with g the row's summed gradient and t = count + 1.
//
// Built and loaded with the top-k kernel by maxrec/native.py.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 128;  // triples or rows per pool task
constexpr int64_t kAhead = 8;    // rows prefetched ahead: the ids are random, so the
                                 // hardware prefetcher cannot guess the next row

// Prefetches `bytes` from p, one cache line at a time.
inline void Prefetch(const float* p, int64_t bytes, bool write) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) {
    if (write) {
      __builtin_prefetch(c + o, 1);
    } else {
      __builtin_prefetch(c + o, 0);
    }
  }
}

// The pool has a thread per core and the caller is one more thread: pool.num_threads() - 1
// helpers keep to one thread per core, so that a helper is not preempted while holding a
// chunk that the others then wait for. (On 2 cores, 1 or 2 helpers gave the same epoch
// times in A/B runs: 0.17-0.21 s.)
template <typename Fn>
bool ParallelFor(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  return maxrec::ParallelFor(pool, n, kChunk, pool.num_threads() - 1, fn);
}

typedef float v8f __attribute__((vector_size(32)));

inline v8f Load(const float* p) {
  v8f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// x = <u, i - j> and sq = |u|² + |i|² + |j|², in 8 lanes (a float sum is not
// vectorised by the compiler, which may not reorder it).
inline void Dots(const float* u, const float* i, const float* j, int64_t d, float* x,
                 float* sq) {
  v8f xv = {}, sv = {};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    const v8f a = Load(u + c), b = Load(i + c), e = Load(j + c);
    xv += a * (b - e);
    sv += a * a + b * b + e * e;
  }
  float xs = 0, ss = 0;
  for (int q = 0; q < 8; ++q) {
    xs += xv[q];
    ss += sv[q];
  }
  for (; c < d; ++c) {
    xs += u[c] * (i[c] - j[c]);
    ss += u[c] * u[c] + i[c] * i[c] + j[c] * j[c];
  }
  *x = xs;
  *sq = ss;
}

inline float Softplus(float z) { return std::max(z, 0.0f) + std::log1p(std::exp(-std::fabs(z))); }

inline float Sigmoid(float z) {
  if (z >= 0) return 1.0f / (1.0f + std::exp(-z));
  const float e = std::exp(z);
  return e / (1.0f + e);
}

struct Scratch {  // per calling thread, reused from step to step
  std::vector<float> grads;
  std::vector<int32_t> uniq;
  std::vector<double> bpr, l2;  // per-chunk partial sums (a fixed order: deterministic)
};

ffi::Error BprStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table_in,
                       ffi::Buffer<ffi::S32> scratch_in, ffi::Buffer<ffi::S32> ids_buf,
                       ffi::Buffer<ffi::S32> count_buf, ffi::Buffer<ffi::F32> scale_buf,
                       ffi::ResultBuffer<ffi::F32> table_out,
                       ffi::ResultBuffer<ffi::S32> scratch_out,
                       ffi::ResultBuffer<ffi::F32> parts, int64_t adam, float lr, float l2_reg,
                       float b1, float b2, float c1, float c2, float eps) {
  auto tdims = table_in.dimensions();
  if (tdims.size() != 2) return ffi::Error::InvalidArgument("maxrec_bpr_step: table must be [n, w]");
  const int64_t n = tdims[0], w = tdims[1];
  const int64_t d = adam ? w / 3 : w;
  if (d < 1 || (adam && w != 3 * d)) {
    return ffi::Error::InvalidArgument("maxrec_bpr_step: an Adam table is [n, 3d]");
  }
  if (scratch_in.element_count() != static_cast<size_t>(n)) {
    return ffi::Error::InvalidArgument("maxrec_bpr_step: scratch must be [n]");
  }
  const int64_t k = ids_buf.element_count();
  if (k % 3 != 0 || k == 0) {
    return ffi::Error::InvalidArgument("maxrec_bpr_step: ids must be [3B] (users, pos, neg)");
  }
  const int64_t batch = k / 3;
  const int32_t* ids = ids_buf.typed_data();
  for (int64_t p = 0; p < k; ++p) {
    if (ids[p] < 0 || ids[p] >= n) {
      return ffi::Error::InvalidArgument("maxrec_bpr_step: a row id is out of range");
    }
  }
  // The table and scratch are aliased with the results (input_output_aliases); copy only
  // if XLA did not alias them.
  float* table = table_out->typed_data();
  int32_t* scratch = scratch_out->typed_data();
  if (table != table_in.typed_data()) {
    std::copy_n(table_in.typed_data(), n * w, table);
  }
  if (scratch != scratch_in.typed_data()) {
    std::copy_n(scratch_in.typed_data(), n, scratch);
  }
  const float scale = scale_buf.typed_data()[0];

  thread_local Scratch s;
  const int64_t chunks = (batch + kChunk - 1) / kChunk;
  try {  // an exception must not cross the FFI boundary (ParallelFor handles its own)
    s.grads.resize(k * d);
    s.bpr.assign(chunks, 0.0);
    s.l2.assign(chunks, 0.0);
    s.uniq.reserve(k);  // push_back below never reallocates
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "maxrec_bpr_step: out of memory");
  }
  float* grads = s.grads.data();
  // The lambdas below run on other threads too, where `s` names another thread's
  // instance: they use these pointers only.
  double* bpr_part = s.bpr.data();
  double* l2_part = s.l2.data();
  const float inv_b = 1.0f / static_cast<float>(batch);
  const float r = l2_reg * scale * inv_b;

  // 1. Per triple: loss terms and the gradient of its three rows.
  // The lambdas capture by value: a captured reference to a float could alias the rows
  // they write, which would keep the compiler from vectorising (4x slower).
  const bool ok = ParallelFor(pool, batch, [=](int64_t lo, int64_t hi) {
    double bpr = 0, l2 = 0;
    for (int64_t b = lo; b < hi; ++b) {
      if (b + kAhead < batch) {
        for (int part = 0; part < 3; ++part) {
          Prefetch(table + ids[part * batch + b + kAhead] * w, d * 4, false);
        }
      }
      const float* eu = table + ids[b] * w;
      const float* ei = table + ids[batch + b] * w;
      const float* ej = table + ids[2 * batch + b] * w;
      float x, sq;
      Dots(eu, ei, ej, d, &x, &sq);
      bpr += Softplus(-x);
      l2 += sq;
      const float g = -Sigmoid(-x) * scale * inv_b;
      float* gu = grads + b * d;
      float* gi = grads + (batch + b) * d;
      float* gj = grads + (2 * batch + b) * d;
      for (int64_t c = 0; c < d; ++c) {
        gu[c] = g * (ei[c] - ej[c]) + r * eu[c];
        gi[c] = g * eu[c] + r * ei[c];
        gj[c] = -g * eu[c] + r * ej[c];
      }
    }
    bpr_part[lo / kChunk] = bpr;
    l2_part[lo / kChunk] = l2;
  });
  if (!ok) return ffi::Error(ffi::ErrorCode::kInternal, "maxrec_bpr_step: a task failed");
  double bpr = 0, l2 = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    bpr += bpr_part[c];
    l2 += l2_part[c];
  }
  // The batch sums are rounded to float32 before the rest, as the XLA step computes
  // them: a sum beyond float32's range is inf there too, so both skip the same steps.
  const float bpr_mean = static_cast<float>(bpr) / static_cast<float>(batch);
  const float l2_term = l2_reg * static_cast<float>(l2) / (2.0f * static_cast<float>(batch));
  const float loss = (bpr_mean + l2_term) * scale;
  float* out = parts->typed_data();
  out[0] = loss;
  out[1] = bpr_mean;
  out[2] = l2_term;
  if (!std::isfinite(loss)) return ffi::Error::Success();  // a skipped step writes nothing

  // 2. One representative per distinct row sums the gradients of its occurrences.
  s.uniq.clear();
  for (int64_t p = 0; p < k; ++p) scratch[ids[p]] = static_cast<int32_t>(p);
  for (int64_t p = 0; p < k; ++p) {
    const int32_t q = scratch[ids[p]];
    if (q == p) {
      s.uniq.push_back(static_cast<int32_t>(p));
    } else {
      float* gq = grads + q * d;
      const float* gp = grads + p * d;
      for (int64_t c = 0; c < d; ++c) gq[c] += gp[c];
    }
  }

  // 3. The update of every distinct row, in place.
  const int32_t* uniq = s.uniq.data();
  if (adam) {
    const float t = static_cast<float>(count_buf.typed_data()[0] + 1);
    const float bc1 = 1.0f - std::pow(b1, t), bc2 = 1.0f - std::pow(b2, t);
    ParallelFor(pool, static_cast<int64_t>(s.uniq.size()), [=](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        if (q + kAhead < hi) Prefetch(table + ids[uniq[q + kAhead]] * w, w * 4, true);
        const int32_t p = uniq[q];
        float* th = table + ids[p] * w;
        float* m = th + d;
        float* v = th + 2 * d;
        const float* g = grads + p * d;
        for (int64_t c = 0; c < d; ++c) {
          const float mc = b1 * m[c] + c1 * g[c];
          const float vc = b2 * v[c] + c2 * g[c] * g[c];
          m[c] = mc;
          v[c] = vc;
          th[c] -= lr * (mc / bc1) / (std::sqrt(vc / bc2) + eps);
        }
      }
    });
  } else {
    ParallelFor(pool, static_cast<int64_t>(s.uniq.size()), [=](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) {
        if (q + kAhead < hi) Prefetch(table + ids[uniq[q + kAhead]] * w, w * 4, true);
        const int32_t p = uniq[q];
        float* th = table + ids[p] * w;
        const float* g = grads + p * d;
        for (int64_t c = 0; c < d; ++c) th[c] -= lr * g[c];
      }
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxrecBprStep, BprStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table [n, w]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // scratch [n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [3B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count []
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale []
                                  .Ret<ffi::Buffer<ffi::F32>>()  // table (aliased)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // scratch (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // (loss, bpr, l2)
                                  .Attr<int64_t>("adam")
                                  .Attr<float>("lr")
                                  .Attr<float>("l2_reg")
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("c1")  // 1 - b1, rounded from double as
                                  .Attr<float>("c2")  // optax's (1 - b) constants are
                                  .Attr<float>("eps"));
