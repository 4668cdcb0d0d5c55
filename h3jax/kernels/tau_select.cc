// Magnitude top-k of a task vector tau = model - base for the streaming TIES merge, on the host, in one pass
// over the two inputs: u_i = the bit pattern of |model_i - base_i| (float32, so unsigned order = magnitude
// order), counted against a bracket [lo, hi] that a sample of u gives (h3jax/kernels/tau_select.py).
//
// Why: numpy needs ~10 passes and three tensor-sized temporaries for the same counts (the difference, its
// bits, a boolean mask per comparison, the compacted candidates): 1.9 ns per entry, the largest cost of a
// TIES merge's reader threads. Here the difference is never stored; each block of kBlock entries is
// computed into a stack buffer (vectorized), counted, and its in-bracket entries appended to `cand`.
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
inline uint32_t AbsDiffBits(T m, T b) {
  float d = ToF32(m) - ToF32(b);
  uint32_t u;
  std::memcpy(&u, &d, 4);
  return u & 0x7FFFFFFFu;
}

// Counts u > hi, u == hi and u == lo over all n entries, and appends every u with lo < u < hi to cand (its
// count returned): a value repeated many times (zeros: most of a sparse task vector) sits on a bracket end
// and is counted, not copied. Returns -1 where more than cap entries fall strictly inside (the caller
// retries with room).
template <typename T>
int64_t Bracket(const T* m, const T* b, int64_t n, uint32_t lo, uint32_t hi, int64_t* counts, uint32_t* cand,
                int64_t cap) {
  alignas(64) uint32_t u[kBlock];
  const uint32_t lo1 = lo + 1, width = hi > lo1 ? hi - lo1 : 0;  // lo < u < hi  <=>  u - lo1 < width (unsigned)
  int64_t gt = 0, eq = 0, eq_lo = 0, c = 0;
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t e = std::min(kBlock, n - s);
    uint32_t g = 0, q = 0, ql = 0, in = 0;
    for (int64_t i = 0; i < e; ++i) {
      u[i] = AbsDiffBits(m[s + i], b[s + i]);
      g += u[i] > hi;
      q += u[i] == hi;
      ql += u[i] == lo;
      in += (u[i] - lo1) < width;
    }
    gt += g;
    eq += q;
    eq_lo += ql;
    if (in) {
      if (c + in >= cap) return -1;  // the branchless append below writes one slot past the last entry
      for (int64_t i = 0; i < e; ++i) {
        cand[c] = u[i];
        c += (u[i] - lo1) < width;
      }
    }
  }
  counts[0] = gt;
  counts[1] = eq;
  counts[2] = eq_lo;
  return c;
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

int64_t H3jaxTauBracketF32(const float* m, const float* b, int64_t n, uint32_t lo, uint32_t hi, int64_t* counts,
                           uint32_t* cand, int64_t cap) {
  return Bracket(m, b, n, lo, hi, counts, cand, cap);
}

int64_t H3jaxTauBracketBF16(const uint16_t* m, const uint16_t* b, int64_t n, uint32_t lo, uint32_t hi,
                            int64_t* counts, uint32_t* cand, int64_t cap) {
  return Bracket(m, b, n, lo, hi, counts, cand, cap);
}

int64_t H3jaxTauTieIndexF32(const float* m, const float* b, int64_t n, uint32_t thr, int64_t need) {
  return TieIndex(m, b, n, thr, need);
}

int64_t H3jaxTauTieIndexBF16(const uint16_t* m, const uint16_t* b, int64_t n, uint32_t thr, int64_t need) {
  return TieIndex(m, b, n, thr, need);
}

}  // extern "C"
