"""Streaming TIES (mergekit mode): magnitude top-k on the host, the rest in one jitted kernel.

The only non-elementwise step of mergekit's TIES is the per-tensor magnitude
top-k. XLA:CPU has no fast selection (scatter histograms ~10 ns per entry,
sort/cumsum ~25 ns), and a host callback inside the kernel would keep the
compiled kernel out of the persistent compilation cache. So the driver finds each
model's cut (k-th largest |tau| and the index tie-break, `select.np_topk_cut`) with
numpy on the arrays it has just read, and passes the cuts as traced arguments to
a kernel compiled once per tensor shape: exactly the output of `h3jax.merging.ties`.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
  b_n = _as_f32(base, load_dtype).reshape(-1)
  n = b_n.size
  buf_n = np.empty(n, np.float32)
  thr_N, cut_N = np.zeros(len(models), np.uint32), np.full(len(models), n - 1, np.int32)
  for i, (m, d) in enumerate(zip(models, density)):
    k = max(1, int(d * n))
    if d >= 1 or k >= n:
      continue  # thr 0, cutoff n - 1: every entry kept
    np.subtract(_as_f32(m, load_dtype).reshape(-1), b_n, out=buf_n)
    bits_n = buf_n.view(np.uint32)
    np.bitwise_and(bits_n, np.uint32(0x7FFFFFFF), out=bits_n)  # |tau| as bits
    thr, n_gt, n_eq = select.np_kth_largest_bits(bits_n, k)
    # A zero threshold keeps zeros only, which add nothing to TIES (no sign, no L1 mass): the
    # index tie-break, a pass over the tensor, only matters for a non-zero threshold.
    thr_N[i] = thr
    cut_N[i] = -1 if thr == 0 else select.np_tie_cutoff(bits_n, thr, k - n_gt, n_eq)
  return thr_N.view(np.float32), cut_N


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
