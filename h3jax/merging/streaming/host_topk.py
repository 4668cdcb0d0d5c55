"""Streaming TIES (mergekit mode): magnitude top-k on the host, the rest in one jitted kernel.

The only non-elementwise step of mergekit's TIES is the per-tensor magnitude
top-k. XLA:CPU has no fast selection (scatter histograms ~10 ns per entry,
sort/cumsum ~25 ns), and a host callback inside the kernel would keep the
compiled kernel out of the persistent compilation cache. So the driver finds each
model's cut (k-th largest |tau| and the index tie-break, `select.np_topk_cut`) on
the arrays it has just read, and passes the cuts as traced arguments to a kernel
compiled once per tensor shape: exactly the output of `h3jax.merging.ties`.

The cuts of float32 / bfloat16 tensors above `select.BRACKET_MIN` entries come from
one native pass over model and base per model (`h3jax.kernels.tau_select`: |tau| is
never stored); the numpy path (elsewhere, or without a C++ compiler) takes ~10 passes
and gives the same cut from the same sample. On SmolLM2-135M with 3 models: 0.75 s
of reader time -> see benchmarks/merge_speed.py.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.kernels import tau_select
from h3jax.merging import rules as rules_lib
from h3jax.merging import select
from h3jax.merging.basic import gta_array

_TIES_KEYS = {"weight", "density", "lambda_", "normalize", "rescale", "mode"}


def ties_hparams(method: str, kwargs: dict, n_models: int) -> Optional[tuple]:
  """`gta_array` hyper-parameters (sorted items) when `kwargs` is a plain mergekit TIES
  tensor (per-model values already resolved for this tensor); None otherwise."""
  if method != "ties" or kwargs.get("mode", "mergekit") != "mergekit" or set(kwargs) - _TIES_KEYS:
    return None
  weight = rules_lib.per_model("weight", kwargs.get("weight", 1.0), n_models)
  density = rules_lib.per_model("density", kwargs.get("density", 1.0), n_models)
  if any(isinstance(v, (list, tuple)) for v in weight + density):
    return None  # an unresolved gradient: leave it to the general path
  hp = dict(weight=tuple(float(w) for w in weight), density=tuple(float(d) for d in density),
            lambda_=float(kwargs.get("lambda_", 1.0)), normalize=bool(kwargs.get("normalize", True)),
            sparsify="magnitude", rescale="l1" if kwargs.get("rescale") else None,
            consensus="mergekit")
  return tuple(sorted(hp.items()))


def _as_f32(x: np.ndarray, load_dtype) -> np.ndarray:
  """The kernel's input cast on the host: through `load_dtype` (mergekit's dtype), then f32."""
  if load_dtype is not None and x.dtype != load_dtype:
    x = x.astype(load_dtype)
  return x if x.dtype == np.float32 else x.astype(np.float32)


def host_cuts(base: np.ndarray, models: Sequence[np.ndarray], density: Sequence[float],
              load_dtype=None):
  """Per model, (thr [N] float32, cutoff [N] int32) of mergekit's magnitude top-k of tau_i,
  k = max(1, int(density_i * numel)); density >= 1 keeps everything."""
  n = base.size
  b_n = buf_n = None  # the numpy path's float32 base and difference, made on first use
  thr_N, cut_N = np.zeros(len(models), np.uint32), np.full(len(models), n - 1, np.int32)
  for i, (m, d) in enumerate(zip(models, density)):
    k = max(1, int(d * n))
    if d >= 1 or k >= n:
      continue  # thr 0, cutoff n - 1: every entry kept
    if n > select.BRACKET_MIN and tau_select.supported(m, base, load_dtype):
      thr_N[i], cut_N[i] = _native_cut(m.reshape(-1), base.reshape(-1), k)
      continue
    if b_n is None:
      b_n, buf_n = _as_f32(base, load_dtype).reshape(-1), np.empty(n, np.float32)
    np.subtract(_as_f32(m, load_dtype).reshape(-1), b_n, out=buf_n)
    bits_n = buf_n.view(np.uint32)
    np.bitwise_and(bits_n, np.uint32(0x7FFFFFFF), out=bits_n)  # |tau| as bits
    thr, n_gt, n_eq = select.np_kth_largest_bits(bits_n, k)
    # A zero threshold keeps zeros only, which add nothing to TIES (no sign, no L1 mass): the
    # index tie-break, a pass over the tensor, only matters for a non-zero threshold.
    thr_N[i] = thr
    cut_N[i] = -1 if thr == 0 else select.np_tie_cutoff(bits_n, thr, k - n_gt, n_eq)
  return thr_N.view(np.float32), cut_N


def _native_cut(m_n: np.ndarray, b_n: np.ndarray, k: int) -> tuple:
  """host_cuts' (thr bits, cutoff) for one model through `tau_select`: the same sample, bracket and
  answer as the numpy path, with |tau| never stored (one native pass per bracket tried)."""
  n = m_n.size
  idx = select.sample_indices(n)
  sample = np.subtract(m_n[idx].astype(np.float32), b_n[idx].astype(np.float32)).view(np.uint32)
  sample &= np.uint32(0x7FFFFFFF)
  found = {}

  def counts(lo, hi):
    frac = np.count_nonzero((sample > lo) & (sample < hi)) / sample.size
    got = tau_select.bracket(m_n, b_n, lo, hi, cap=int(1.25 * frac * n) + 4096)
    if got is None:  # far more entries inside than the sample showed: room for all
      got = tau_select.bracket(m_n, b_n, lo, hi, cap=n)
    n_gt, n_eq, found["eq_lo"], found["cand"] = got
    return n_gt, n_eq

  thr, n_gt, n_eq = select.kth_largest_in_bracket(n, k, sample, counts,
                                                  lambda lo, hi: (found["cand"], found["eq_lo"]))
  if thr == 0:
    return thr, -1
  return thr, (n - 1 if k - n_gt == n_eq else tau_select.tie_index(m_n, b_n, thr, k - n_gt))


@functools.lru_cache(maxsize=64)
def ties_kernel(hp_items: tuple, load_dtype: Optional[str]) -> Callable:
  """jit(base_X, [models_X], thr_N, cutoff_N) -> merged float32, hyper-parameters static."""
  hp = dict(hp_items)
  load_dt = None if load_dtype is None else jnp.dtype(load_dtype)

  def cast(x):
    x = x if load_dt is None else x.astype(load_dt)
    return x.astype(jnp.float32)

  def run(base_X, models, thr_N, cut_N):
    return gta_array(cast(base_X), [cast(m) for m in models], None, cuts=(thr_N, cut_N), **hp)

  return jax.jit(run)
