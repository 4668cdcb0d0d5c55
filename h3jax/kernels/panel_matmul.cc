// y[N, O] = x[N, I] @ W for few rows N (decoding), with W packed in panels [P, I, 8] (P = ceil(O / 8),
// panel p holds columns 8p..8p+7, zero-padded): every panel is one contiguous stream, and each loaded
// weight vector is used for all rows of a row block, whose accumulators stay in registers.
//
// Why: XLA:CPU runs these skinny products on one thread at 10-17 GB/s; two threads streaming panels reach
// the machine's memory bandwidth (h3jax/kernels/cpu_matmul.py, benchmarks/model_speed.py).
// Panels are shared out in chunks through an atomic counter: the calling thread works too, and helpers
// scheduled on XLA's intra-op pool that start after every chunk is claimed return at once, so the call
// never waits on a helper that has not started.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kPrefetch = 256;  // floats ahead in each panel stream: ~10% at 8 rows, none at 1 (measured)
typedef float v8 __attribute__((vector_size(32)));

inline v8 Load(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }

inline v8 Splat(float s) {
#if defined(__AVX__)
  return (v8)_mm256_set1_ps(s);  // one vbroadcastss (a lane-by-lane fill compiles to 7 vinsertps)
#else
  return (v8){s, s, s, s, s, s, s, s};
#endif
}

// acc + a * b with one rounding order in every block shape: a fused multiply-add where the CPU has one,
// else a multiply and an add (the build passes -ffp-contract=off, so the compiler never fuses some of them
// and not others), which keeps each row's result independent of the rows it is batched with.
inline v8 MulAdd(v8 a, v8 b, v8 acc) {
#if defined(__FMA__)
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
  return acc + a * b;
#endif
}

inline void Store(float* p, v8 v, int64_t cols) {
  if (cols == kLanes) { std::memcpy(p, &v, sizeof v); return; }
  float t[kLanes];
  std::memcpy(t, &v, sizeof v);
  std::memcpy(p, t, cols * sizeof(float));
}

// NB rows of x times PB consecutive panels; acc: NB * PB vector registers.
template <int NB, int PB>
inline void Block(const float* x, int64_t I, const float* w, float* y, int64_t O, int64_t col0) {
  v8 acc[NB][PB] = {};
  for (int64_t i = 0; i < I; ++i) {
    v8 wv[PB];
    for (int b = 0; b < PB; ++b) {
      wv[b] = Load(w + (b * I + i) * kLanes);
      __builtin_prefetch(w + (b * I + i) * kLanes + kPrefetch);
    }
    for (int n = 0; n < NB; ++n) {
      const v8 xs = Splat(x[n * I + i]);
      for (int b = 0; b < PB; ++b) acc[n][b] = MulAdd(xs, wv[b], acc[n][b]);
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int b = 0; b < PB; ++b) {
      const int64_t c = col0 + b * kLanes;
      Store(y + n * O + c, acc[n][b], std::min(kLanes, O - c));
    }
}

// NB rows times every panel in [p0, p1), PB panels at a time (the last p1 - p0 mod PB one by one).
template <int NB, int PB>
void Rows(const float* x, int64_t I, const float* w, float* y, int64_t O, int64_t p0, int64_t p1) {
  int64_t p = p0;
  for (; p + PB <= p1; p += PB) Block<NB, PB>(x, I, w + p * I * kLanes, y, O, p * kLanes);
  for (; p < p1; ++p) Block<NB, 1>(x, I, w + p * I * kLanes, y, O, p * kLanes);
}

// Panels per block for NB = 1..8 rows: as many as keep NB * PB accumulators, PB weight vectors and a row
// broadcast in registers (AVX2: 16; AVX-512VL: 32, where 8 rows take 3 panels instead of 1, which cuts the
// row broadcasts per multiply-add that bound the 8-row product). Measured with benchmarks/decode_kernel.py on
// 2 Xeon cores, SmolLM2's layers: 8 rows 23.8 / 25.8 ms -> 16.7 / 16.2 ms (the streaming limit ~14 ms).
#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr int kPanelsFor[9] = {0, 4, 4, 4, 4, 4, 4, 3, 3};
#else
constexpr int kPanelsFor[9] = {0, 4, 4, 3, 2, 2, 2, 1, 1};
#endif

template <int NB>
void RowBlock(const float* x, int64_t I, const float* w, float* y, int64_t O, int64_t p0, int64_t p1) {
  Rows<NB, kPanelsFor[NB]>(x, I, w, y, O, p0, p1);
}

// Rows in blocks of 8, the rest (1-7) in one more block: every block streams the panels once, so 5-7 rows
// (a batch after finished rows left it) cost one pass, not the 2-3 of blocks of 4 / 2 / 1. Each row's sums
// run in the same order in any block, so a row's result does not depend on the rows it is batched with.
void Panels(const float* x, int64_t N, int64_t I, const float* w, float* y, int64_t O, int64_t p0, int64_t p1) {
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) RowBlock<8>(x + n * I, I, w, y + n * O, O, p0, p1);
  x += n * I;
  y += n * O;
  switch (N - n) {
    case 7: RowBlock<7>(x, I, w, y, O, p0, p1); break;
    case 6: RowBlock<6>(x, I, w, y, O, p0, p1); break;
    case 5: RowBlock<5>(x, I, w, y, O, p0, p1); break;
    case 4: RowBlock<4>(x, I, w, y, O, p0, p1); break;
    case 3: RowBlock<3>(x, I, w, y, O, p0, p1); break;
    case 2: RowBlock<2>(x, I, w, y, O, p0, p1); break;
    case 1: RowBlock<1>(x, I, w, y, O, p0, p1); break;
    default: break;
  }
}

constexpr int kMaxWeights = 8;

// One call multiplies the same rows by up to kMaxWeights packed weights (q / k / v, gate / up): their panels
// form one list of chunks, so the pool is woken and waited for once per group instead of once per weight.
struct Job {
  const float* x;
  int64_t N, I, chunk, chunks = 0;
  int count = 0;
  const float* w[kMaxWeights];
  float* y[kMaxWeights];
  int64_t O[kMaxWeights], P[kMaxWeights], first[kMaxWeights + 1];  // first: weight j's first chunk
  std::atomic<int64_t> next{0}, done{0};
  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      int j = 0;
      while (c >= first[j + 1]) ++j;
      const int64_t p0 = (c - first[j]) * chunk;
      Panels(x, N, I, w[j], y[j], O[j], p0, std::min(P[j], p0 + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PanelMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                       ffi::RemainingRets ys) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("panel_matmul: want x [N, I]");
  const int64_t N = xd[0], I = xd[1];
  if (ws.size() != ys.size() || ws.size() < 1 || ws.size() > kMaxWeights)
    return ffi::Error::InvalidArgument("panel_matmul: want 1-8 weights and as many results");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data(); job->N = N; job->I = I; job->count = static_cast<int>(ws.size());
  int64_t total = 0;
  for (int j = 0; j < job->count; ++j) {
    auto w = ws.get<ffi::Buffer<ffi::F32>>(j);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !y.has_value()) return ffi::Error::InvalidArgument("panel_matmul: want float32");
    auto wd = w->dimensions(), yd = (*y)->dimensions();
    if (wd.size() != 3 || yd.size() != 2 || wd[2] != kLanes)
      return ffi::Error::InvalidArgument("panel_matmul: want w [P, I, 8], y [N, O]");
    const int64_t P = wd[0], O = yd[1];
    if (wd[1] != I || yd[0] != N || P != (O + kLanes - 1) / kLanes)
      return ffi::Error::InvalidArgument("panel_matmul: shapes do not agree");
    job->w[j] = w->typed_data(); job->y[j] = (*y)->typed_data(); job->O[j] = O; job->P[j] = P;
    if (I == 0 && N * O) std::memset(job->y[j], 0, N * O * sizeof(float));
    total += P;
  }
  if (N == 0 || I == 0 || total == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~4 chunks per thread for balance, none under 4 panels or 32 KiB of weights.
  const int64_t min_chunk = std::max<int64_t>(4, 32768 / (I * kLanes * 4) + 1);
  job->chunk = std::max(min_chunk, (total + 4 * threads - 1) / (4 * threads));
  for (int j = 0; j < job->count; ++j) {
    job->first[j] = job->chunks;
    job->chunks += (job->P[j] + job->chunk - 1) / job->chunk;
  }
  job->first[job->count] = job->chunks;
  const int64_t helpers = std::min(threads - 1, job->chunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(H3jaxPanelMatmulF32, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
