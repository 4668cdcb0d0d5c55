// Magnitude top-k of a task vector tau = model - base for the streaming TIES merge, on the host, in one pass
// over the two inputs: u_i = the bit pattern of |model_i - base_i| (float32, so unsigned order = magnitude
// order), counted against a bracket [lo, hi] that a sample of u gives (h3jax/kernels/tau_select.py). All
// models of a tensor share one pass, so the base is read once, and the pass also checks every input for
// NaN / inf (the streaming driver's input check, otherwise one more pass per input).
//
// Why: numpy needs ~10 passes and three tensor-sized temporaries for the same counts (the difference, its
// bits, a boolean mask per comparison, the compacted candidates): 1.9 ns per entry, the largest cost of a
// TIES merge's reader threads. Here the difference is never stored; each block of kBlock entries is
// computed into a stack buffer, counted, and its in-bracket entries appended to the model's candidates.
// Inputs are float32 or bfloat16 (both converted to float32 exactly, as the numpy path does).
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlock = 256;

inline float ToF32(float x) { return x; }
inline float ToF32(uint16_t bf16) {  // bfloat16 bits -> float32 (exact)
  uint32_t u = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline uint32_t AbsDiffBits(T m, T b) {  // the bit pattern of |m - b| as float32
  float d = ToF32(m) - ToF32(b);
  uint32_t u;
  std::memcpy(&u, &d, 4);
  return u & 0x7FFFFFFFu;
}

inline uint32_t NonFinite(float x) {  // 1 for NaN / inf
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x7F800000u) == 0x7F800000u;
}

// For each of M models j, one pass over all n entries of the model and the base together: counts u > hi[j],
// u == hi[j] and u == lo[j] into counts[3j .. 3j+2], and appends every u with lo[j] < u < hi[j] to cand[j]
// (their number into n_cand[j]); a value repeated many times (zeros: most of a sparse task vector) sits on
// a bracket end and is counted, not copied. nonfinite[0] gets the number of NaN / inf entries in the base
// and the models (the inputs' check, in the same pass). Returns -1 where more than cap[j] entries of some
// model fall strictly inside its bracket (nothing is then complete; the caller retries with room), else 0.
template <typename T>
int64_t Brackets(const T* const* ms, int64_t M, const T* b, int64_t n, const uint32_t* lo, const uint32_t* hi,
                 int64_t* counts, uint32_t* const* cand, const int64_t* cap, int64_t* n_cand, int64_t* nonfinite) {
  alignas(64) uint32_t u[kBlock];
  alignas(64) float bf[kBlock];
  int64_t bad = 0;
  for (int64_t j = 0; j < M; ++j) counts[3 * j] = counts[3 * j + 1] = counts[3 * j + 2] = n_cand[j] = 0;
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t e = std::min(kBlock, n - s);
    uint32_t nb = 0;
    for (int64_t i = 0; i < e; ++i) {
      bf[i] = ToF32(b[s + i]);
      nb += NonFinite(bf[i]);
    }
    bad += nb;
    for (int64_t j = 0; j < M; ++j) {
      const T* m = ms[j] + s;
      const uint32_t h = hi[j], l = lo[j], lo1 = l + 1, width = h > lo1 ? h - lo1 : 0;  // lo < u < hi
      uint32_t g = 0, q = 0, ql = 0, in = 0, nm = 0;
      for (int64_t i = 0; i < e; ++i) {
        const float x = ToF32(m[i]);
        nm += NonFinite(x);
        u[i] = AbsDiffBits(x, bf[i]);
        g += u[i] > h;
        q += u[i] == h;
        ql += u[i] == l;
        in += (u[i] - lo1) < width;  // unsigned: lo < u < hi
      }
      counts[3 * j] += g;
      counts[3 * j + 1] += q;
      counts[3 * j + 2] += ql;
      bad += nm;
      if (in) {
        int64_t c = n_cand[j];
        if (c + in > cap[j]) return -1;  // cand[j] has cap[j] + 1 slots: the branchless append writes one past
        uint32_t* out = cand[j];
        for (int64_t i = 0; i < e; ++i) {
          out[c] = u[i];
          c += (u[i] - lo1) < width;
        }
        n_cand[j] = c;
      }
    }
  }
  nonfinite[0] = bad;
  return 0;
}

// Flat index of the need-th entry (1-based) with u == thr, or -1 if there are fewer.
template <typename T>
int64_t TieIndex(const T* m, const T* b, int64_t n, uint32_t thr, int64_t need) {
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t e = std::min(kBlock, n - s);
    int64_t q = 0;
    for (int64_t i = 0; i < e; ++i) q += AbsDiffBits(m[s + i], b[s + i]) == thr;
    if (need > q) {
      need -= q;
      continue;
    }
    for (int64_t i = 0; i < e; ++i)
      if (AbsDiffBits(m[s + i], b[s + i]) == thr && --need == 0) return s + i;
  }
  return -1;
}

}  // namespace

extern "C" {

int64_t H3jaxTauBracketsF32(const float* const* ms, int64_t M, const float* b, int64_t n, const uint32_t* lo,
                            const uint32_t* hi, int64_t* counts, uint32_t* const* cand, const int64_t* cap,
                            int64_t* n_cand, int64_t* nonfinite) {
  return Brackets(ms, M, b, n, lo, hi, counts, cand, cap, n_cand, nonfinite);
}

int64_t H3jaxTauBracketsBF16(const uint16_t* const* ms, int64_t M, const uint16_t* b, int64_t n, const uint32_t* lo,
                             const uint32_t* hi, int64_t* counts, uint32_t* const* cand, const int64_t* cap,
                             int64_t* n_cand, int64_t* nonfinite) {
  return Brackets(ms, M, b, n, lo, hi, counts, cand, cap, n_cand, nonfinite);
}

int64_t H3jaxTauTieIndexF32(const float* m, const float* b, int64_t n, uint32_t thr, int64_t need) {
  return TieIndex(m, b, n, thr, need);
}

int64_t H3jaxTauTieIndexBF16(const uint16_t* m, const uint16_t* b, int64_t n, uint32_t thr, int64_t need) {
  return TieIndex(m, b, n, thr, need);
}

}  // extern "C"
