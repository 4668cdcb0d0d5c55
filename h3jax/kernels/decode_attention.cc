// One decode step's attention (one new query per row) read in place from the stacked KV cache:
// out[b, (k, r, :)] = softmax_s(q[b, k, r] . K[layer, b, s, k] / sqrt(Dh), masked) @ V[layer, b, s, k]
// for s < kv_len, with the cache [L, B, S, K, Dh] of every layer as XLA holds it.
//
// Why: XLA:CPU runs the two einsums over a layer's cache slice as loop fusions on one thread: SmolLM2's 30
// layers at 96 slots took 19.8 ms at 8 rows and 1.5 ms at 1 row, this kernel 3.1 / 0.7 ms, reading the caches
// once 1.3 / 0.17 ms (benchmarks/decode_kernel.py). The (row, kv head) pairs are shared among the calling
// thread and XLA's intra-op pool; each reads its keys and values once.
//
// Masked scores are float32's lowest value before the softmax, as layers._masked_softmax sets them (a query
// with no key attends uniformly).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kMaxGroup = 16;  // query heads per kv head (R)
constexpr int64_t kMaxDh = 256;
typedef float v8 __attribute__((vector_size(32)));

inline v8 Load(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void StoreV(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 Splat(float s) { return (v8){s, s, s, s, s, s, s, s}; }
inline float Sum(v8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// The lane sums of a[0..7] as one vector, each summed in Sum's order.
inline v8 Sums(const v8* a) {
#if defined(__AVX__)
  const __m256 t0 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), t1 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  const __m256 t2 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), t3 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return (v8)_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  v8 out;
  for (int t = 0; t < 8; ++t) out[t] = Sum(a[t]);
  return out;
#endif
}

struct Job {
  const float *q, *k, *v;
  const bool* mask;
  float* out;
  int64_t B, S, K, R, Dh, kv_len, layer;
  float scale;
  std::atomic<int64_t> next{0}, done{0};

  // Row b, kv head kh: its R query heads against the first kv_len slots.
  void Pair(int64_t b, int64_t kh, float* scores) const {
    const int64_t V8 = Dh / kLanes, stride = K * Dh;
    const float* kb = k + ((layer * B + b) * S) * stride + kh * Dh;
    const float* vb = v + ((layer * B + b) * S) * stride + kh * Dh;
    const float* qb = q + (b * K + kh) * R * Dh;
    const bool* mb = mask + b * kv_len;
    int64_t s = 0;
    for (; s + kLanes <= kv_len; s += kLanes) {  // 8 keys at a time: 8 independent sums, reduced together
      for (int64_t r = 0; r < R; ++r) {
        v8 acc[kLanes];
        for (int64_t t = 0; t < kLanes; ++t) acc[t] = Splat(0.f);
        for (int64_t j = 0; j < V8; ++j) {
          const v8 qv = Load(qb + r * Dh + j * kLanes);
          for (int64_t t = 0; t < kLanes; ++t) acc[t] += qv * Load(kb + (s + t) * stride + j * kLanes);
        }
        float sums[kLanes];
        StoreV(sums, Sums(acc));
        for (int64_t t = 0; t < kLanes; ++t) scores[r * kv_len + s + t] = mb[s + t] ? sums[t] * scale : -FLT_MAX;
      }
    }
    for (; s < kv_len; ++s) {
      const float* ks = kb + s * stride;
      for (int64_t r = 0; r < R; ++r) {
        v8 acc = Splat(0.f);
        for (int64_t j = 0; j < V8; ++j) acc += Load(qb + r * Dh + j * kLanes) * Load(ks + j * kLanes);
        scores[r * kv_len + s] = mb[s] ? Sum(acc) * scale : -FLT_MAX;
      }
    }
    for (int64_t r = 0; r < R; ++r) {  // softmax over s
      float* sc = scores + r * kv_len;
      float m = -FLT_MAX;
      for (int64_t s = 0; s < kv_len; ++s) m = std::max(m, sc[s]);
      float total = 0.f;
      for (int64_t s = 0; s < kv_len; ++s) total += (sc[s] = std::exp(sc[s] - m));
      const float inv = 1.f / total;
      for (int64_t s = 0; s < kv_len; ++s) sc[s] *= inv;
    }
    float* ob = out + (b * K + kh) * R * Dh;
    for (int64_t r = 0; r < R; ++r) {
      v8 acc[kMaxDh / kLanes];
      for (int64_t j = 0; j < V8; ++j) acc[j] = Splat(0.f);
      const float* sc = scores + r * kv_len;
      for (int64_t s = 0; s < kv_len; ++s) {
        const v8 p = Splat(sc[s]);
        const float* vs = vb + s * stride;
        for (int64_t j = 0; j < V8; ++j) acc[j] += p * Load(vs + j * kLanes);
      }
      for (int64_t j = 0; j < V8; ++j) StoreV(ob + r * Dh + j * kLanes, acc[j]);
    }
  }

  void Work() {
    std::vector<float> scores(R * kv_len);
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < B * K;) {
      Pair(c / K, c % K, scores.data());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> layer,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || md.size() != 2 || v.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("decode_attention: want q [B, K, R, Dh], caches [L, B, S, K, Dh], mask [B, n]");
  auto job = std::make_shared<Job>();
  job->B = qd[0]; job->K = qd[1]; job->R = qd[2]; job->Dh = qd[3];
  job->S = kd[2]; job->kv_len = md[1];
  for (int i = 0; i < 5; ++i)
    if (v.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("decode_attention: k and v caches differ");
  if (kd[1] != job->B || kd[3] != job->K || kd[4] != job->Dh || md[0] != job->B || job->kv_len > job->S ||
      job->kv_len < 1 || job->Dh % kLanes || job->Dh > kMaxDh || job->R > kMaxGroup)
    return ffi::Error::InvalidArgument("decode_attention: shapes do not agree");
  job->layer = layer.typed_data()[0];
  if (job->layer < 0 || job->layer >= kd[0]) return ffi::Error::InvalidArgument("decode_attention: bad layer");
  job->q = q.typed_data(); job->k = k.typed_data(); job->v = v.typed_data();
  job->mask = mask.typed_data(); job->out = out->typed_data();
  job->scale = 1.f / std::sqrt(static_cast<float>(job->Dh));
  const int64_t tasks = job->B * job->K;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()) - 1, tasks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(H3jaxDecodeAttentionF32, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
