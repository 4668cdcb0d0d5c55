"""Exact magnitude top-k (TIES trimming) without a sort.

Magnitude top-k only needs the k-th largest |x| and, when that magnitude is
repeated, where the index tie-break stops; not an order. Non-negative float32
values order like their uint32 bit patterns, so everything works on those bits
(NaN sorts above inf, like torch.topk).

Two implementations, picked per lowering platform (`jax.lax.platform_dependent`):
* CPU: a host callback into numpy. XLA:CPU's scatter (histograms) costs ~10 ns per
  entry and its sort/cumsum ~25 ns; numpy finds the k-th value from a random
  sample's bracket plus three counting passes and a partition of the few entries
  inside the bracket (~2 ns per entry, robust to repeated values such as zeros).
* elsewhere (GPU/TPU): radix select, two 65536-bin histograms (high 16 bits, then
  low 16 bits inside the selected bin), and a blocked prefix count for ties.

`topk_mask` is mergekit's `magnitude` sparsification: exactly k largest |x|, ties at
the k-th magnitude broken by flat index (mergekit's argsort order is arbitrary).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_BINS = 1 << 16
_ROW = 1024
_SAMPLE = 1 << 14  # random sample size for the numpy bracket
BRACKET_MIN = 4 * _SAMPLE  # at most this many entries: one partition of them all, no bracket


# ----------------------------------------------------------------------------- numpy (CPU host)

def np_kth_largest_bits(bits_n: np.ndarray, k: int):
  """(t, #entries > t, #entries == t) for t the k-th largest of uint32 `bits_n` (1 <= k <= n).

  Exact, O(n): a random sample gives a bracket [lo, hi] that holds the answer
  with overwhelming probability; counting passes check it (a miss widens the
  bracket, so the result never depends on the sample) and only the entries
  strictly inside are partitioned.
  """
  n = bits_n.size
  if n <= BRACKET_MIN:
    t = np.partition(bits_n, n - k)[n - k]
    n_ge = np.count_nonzero(bits_n >= t)
    return t, n - np.count_nonzero(bits_n <= t), n_ge - np.count_nonzero(bits_n > t)
  return kth_largest_in_bracket(
      n, k, np.sort(bits_n[sample_indices(n)]),
      lambda lo, hi: (np.count_nonzero(bits_n > hi), np.count_nonzero(bits_n == hi)),
      lambda lo, hi: (bits_n[(bits_n > lo) & (bits_n < hi)], np.count_nonzero(bits_n == lo)))


@functools.lru_cache(maxsize=64)
def sample_indices(n: int) -> np.ndarray:
  """The bracket's random sample of positions (seeded by n: the same cut on every run), ascending so the
  gathers run forward; cached: a model has a handful of tensor sizes, each cut three times or more."""
  idx = np.sort(np.random.default_rng(n).integers(0, n, _SAMPLE))
  idx.flags.writeable = False
  return idx


def bracket_ends(n: int, k: int, s_m: np.ndarray, widen: int = 0) -> tuple:
  """(lo, hi) around the k-th largest of n values, from the ascending sample `s_m` of them; each `widen`
  step makes the margin 8x wider (after a miss)."""
  pos = int((n - k) / n * (s_m.size - 1))  # ascending rank of the answer, in sample units
  margin = (4 * int(np.sqrt(s_m.size)) + 2) * 8 ** widen
  lo = s_m[pos - margin] if pos - margin > 0 else np.uint32(0)
  hi = s_m[pos + 1 + margin] if pos + 1 + margin < s_m.size else np.uint32(0xFFFFFFFF)
  return lo, hi


def kth_largest_in_bracket(n: int, k: int, s_m: np.ndarray, counts, inside):
  """np_kth_largest_bits' search over n uint32 values seen only through `s_m` (their values at
  `sample_indices(n)`, ascending), `counts(lo, hi)` -> (#values > hi, #values == hi) and `inside(lo, hi)`
  -> (the values strictly between lo and hi, #values == lo), called only after counts(lo, hi): so a
  native pass can give both at once. A value repeated many times (the zeros of a sparse task vector)
  lands on a bracket end, where it is counted rather than partitioned."""
  widen = 0
  while True:
    lo, hi = bracket_ends(n, k, s_m, widen)
    n_gt_hi, n_eq_hi = counts(lo, hi)
    n_ge_hi = n_gt_hi + n_eq_hi
    if n_gt_hi < k <= n_ge_hi:
      return hi, n_gt_hi, n_eq_hi
    if k > n_ge_hi and lo < hi:
      cand, n_eq_lo = inside(lo, hi)
      n_gt_lo = n_ge_hi + cand.size
      if k <= n_gt_lo:
        t = np.partition(cand, n_gt_lo - k)[n_gt_lo - k]  # ascending rank of the answer in cand
        return t, n_ge_hi + np.count_nonzero(cand > t), np.count_nonzero(cand == t)
      if k <= n_gt_lo + n_eq_lo:
        return lo, n_gt_lo, n_eq_lo
    widen += 1  # sample missed (adversarial layout): widen; exactness never depends on it


def np_topk_cut(bits_n: np.ndarray, k: int):
  """(thr bits, cutoff) for the k largest of uint32 `bits_n` (1 <= k <= n): entries > thr
  plus the entries == thr at flat index <= cutoff."""
  thr, n_gt, n_eq = np_kth_largest_bits(bits_n, k)
  return thr, np_tie_cutoff(bits_n, thr, k - n_gt, n_eq)


def np_tie_cutoff(bits_n: np.ndarray, thr, need: int, n_eq: int) -> int:
  """Flat index of the need-th entry equal to thr (1 <= need <= n_eq = their count)."""
  if need == n_eq:
    return bits_n.size - 1
  step = 1 << 20
  for start in range(0, bits_n.size, step):  # chunk counts first: one index array, of one chunk
    chunk_n = bits_n[start:start + step]
    c = np.count_nonzero(chunk_n == thr)
    if need <= c:
      return start + int(np.flatnonzero(chunk_n == thr)[need - 1])
    need -= c
  raise AssertionError("unreachable: fewer tied entries than counted")


def _np_topk_cut(a_n, k: int):
  """np_topk_cut for a float32 |a| array -> (thr float32, cutoff int32)."""
  thr, cutoff = np_topk_cut(np.asarray(a_n, np.float32).view(np.uint32), k)
  return np.array(thr, np.uint32).view(np.float32), np.int32(cutoff)


def _cpu_topk_cut(a_n, k: int):
  out = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
  return jax.pure_callback(lambda a: _np_topk_cut(a, k), out, a_n, vmap_method="sequential")


# ----------------------------------------------------------------------------- radix select (jit)

def _count_from_top(hist_B):
  """c[i] = number of entries in bins >= B-1-i (cumulative count from the largest bin)."""
  return jnp.cumsum(hist_B[::-1])


def _radix_kth_largest_abs(x_X, k: int):
  a_n = jnp.abs(x_X.reshape(-1).astype(jnp.float32))
  bits_n = jax.lax.bitcast_convert_type(a_n, jnp.uint32)
  hi_n = (bits_n >> 16).astype(jnp.int32)
  c_B = _count_from_top(jnp.zeros(_BINS, jnp.int32).at[hi_n].add(1))
  r = jnp.searchsorted(c_B, k)  # first position from the top whose count reaches k
  hi = _BINS - 1 - r
  above = jnp.where(r > 0, c_B[jnp.maximum(r - 1, 0)], 0)  # entries in strictly higher bins
  lo_n = jnp.where(hi_n == hi, (bits_n & 0xFFFF).astype(jnp.int32), _BINS)
  c2_B = _count_from_top(jnp.zeros(_BINS, jnp.int32).at[lo_n].add(1, mode="drop"))
  lo = _BINS - 1 - jnp.searchsorted(c2_B, k - above)
  bits = (hi.astype(jnp.uint32) << 16) | lo.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def first_true(eq_n, need):
  """Keeps the first `need` True entries of the 1-D bool eq_n (need traced, >= 0).

  Blocked instead of a length-n cumsum: per-row counts over rows of 1024, a
  cumsum over the rows, and one cumsum inside the row holding the need-th True.
  """
  return eq_n & (jnp.arange(eq_n.shape[0]) <= _first_true_cutoff(eq_n, need))


def _first_true_cutoff(eq_n, need):
  """Flat index of the need-th True entry of eq_n (-1 when need == 0)."""
  n = eq_n.shape[0]
  rows = -(-n // _ROW)
  eq_BR = jnp.pad(eq_n, (0, rows * _ROW - n)).reshape(rows, _ROW)
  cum_B = jnp.cumsum(jnp.sum(eq_BR, axis=1, dtype=jnp.int32))
  r = jnp.minimum(jnp.searchsorted(cum_B, need), rows - 1)  # row of the need-th True entry
  before = jnp.where(r > 0, cum_B[jnp.maximum(r - 1, 0)], 0)
  in_row_R = jnp.cumsum(jax.lax.dynamic_index_in_dim(eq_BR, r, keepdims=False).astype(jnp.int32))
  j = jnp.searchsorted(in_row_R, need - before)  # its column
  return jnp.where(need > 0, r * _ROW + j, -1).astype(jnp.int32)


def _radix_topk_cut(a_n, k: int):
  thr = _radix_kth_largest_abs(a_n, k)
  bits_n = jax.lax.bitcast_convert_type(a_n, jnp.uint32)
  thr_bits = jax.lax.bitcast_convert_type(thr, jnp.uint32)
  need = k - jnp.sum(bits_n > thr_bits, dtype=jnp.int32)
  return thr, _first_true_cutoff(bits_n == thr_bits, need)


# ----------------------------------------------------------------------------- public

def topk_cut(x_X, k: int):
  """(thr, cutoff) for 1 <= k <= numel: the k largest |x| are |x| > thr plus the entries
  with |x| == thr at flat index <= cutoff."""
  a_n = jnp.abs(x_X.reshape(-1).astype(jnp.float32))
  return jax.lax.platform_dependent(a_n, cpu=lambda a: _cpu_topk_cut(a, k),
                                    default=lambda a: _radix_topk_cut(a, k))


def kth_largest_abs(x_X, k: int):
  """The k-th largest |x| (1-based, k static, 1 <= k <= numel) as float32, exactly."""
  return topk_cut(x_X, k)[0]


def exact_topk_mask(x_X, k: int):
  """Exactly the k largest |x|; ties at the k-th magnitude broken by flat index."""
  n = x_X.size
  if k >= n:
    return jnp.ones(x_X.shape, bool)
  if k <= 0:
    return jnp.zeros(x_X.shape, bool)
  return mask_from_cut(x_X, *topk_cut(x_X, k))


def mask_from_cut(x_X, thr, cutoff):
  """|x| > thr, plus |x| == thr at flat index <= cutoff (compared as bits: exact for NaN)."""
  bits_X = jax.lax.bitcast_convert_type(jnp.abs(x_X.astype(jnp.float32)), jnp.uint32)
  thr_bits = jax.lax.bitcast_convert_type(jnp.asarray(thr, jnp.float32), jnp.uint32)
  idx_X = jax.lax.broadcasted_iota(jnp.int32, (x_X.size,), 0).reshape(x_X.shape)
  return (bits_X > thr_bits) | ((bits_X == thr_bits) & (idx_X <= cutoff))


def topk_mask(x_X, density: float):
  """Keep exactly k = max(1, int(density * numel)) largest |x|; ties at the k-th by flat index."""
  n = x_X.size
  if density >= 1:
    return jnp.ones(x_X.shape, bool)
  if density <= 0 or n == 0:
    return jnp.zeros(x_X.shape, bool)
  return exact_topk_mask(x_X, max(1, int(density * n)))
