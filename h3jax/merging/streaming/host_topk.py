"""Streaming TIES (mergekit mode): magnitude top-k on the host, the rest in one jitted kernel.

The only non-elementwise step of mergekit's TIES is the per-tensor magnitude
top-k. XLA:CPU has no fast selection (scatter histograms ~10 ns per entry,
sort/cumsum ~25 ns), and a host callback inside the kernel would keep the
compiled kernel out of the persistent compilation cache. So the driver finds each
model's cut (k-th largest |tau| and the index tie-break, `select.np_topk_cut`) on
the arrays it has just read, and passes the cuts as traced arguments to a kernel
compiled once per tensor shape: exactly the output of `h3jax.merging.ties`.

The cuts of float32 / bfloat16 tensors above `select.BRACKET_MIN` entries come from
one native pass over the base and all models of a tensor (`h3jax.kernels.tau_select`:
|tau| is never stored, and the inputs are checked for NaN / inf on the way); the numpy
path (elsewhere, or without a C++ compiler) takes ~10 passes per model and gives the
same cut from the same sample. SmolLM2-135M x 3 models: 0.41 s against 0.75 s.
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
  return host_cuts_checked(base, models, density, load_dtype)[:2]


def host_cuts_checked(base: np.ndarray, models: Sequence[np.ndarray], density: Sequence[float],
                      load_dtype=None):
  """host_cuts, and whether the inputs are finite: True / False where the native pass read every input (it
  checks them as it goes), None where some were not read natively (the caller checks them)."""
  n = base.size
  k_N = [max(1, int(d * n)) for d in density]
  keep_all = [d >= 1 or k >= n for d, k in zip(density, k_N)]  # thr 0, cutoff n - 1: every entry kept
  thr_N, cut_N = np.zeros(len(models), np.uint32), np.full(len(models), n - 1, np.int32)
  native = [i for i, m in enumerate(models) if not keep_all[i] and n > select.BRACKET_MIN
            and tau_select.supported(m, base, load_dtype)]
  finite = _native_cuts(base.reshape(-1), [models[i].reshape(-1) for i in native], [k_N[i] for i in native],
                        thr_N, cut_N, native) if native else None
  if len(native) < len(models):
    finite = None  # a model kept whole, or cut with numpy below, was not read by the native pass
  b_n = buf_n = None  # the numpy path's float32 base and difference, made on first use
  for i, (m, k) in enumerate(zip(models, k_N)):
    if keep_all[i] or i in native:
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
  return thr_N.view(np.float32), cut_N, finite


def _native_cuts(b_n, ms, k_M, thr_N, cut_N, slots) -> Optional[bool]:
  """Fills thr_N / cut_N at `slots` with the cuts of models `ms` through `tau_select`: the same samples,
  brackets and answers as the numpy path. The first bracket of every model comes from one pass over the
  base and all the models (which also counts NaN / inf); a model whose bracket missed gets passes of its
  own. Returns whether the inputs are finite (None: the first pass overflowed and was not completed)."""
  n = b_n.size
  idx = select.sample_indices(n)
  b_s = b_n[idx].astype(np.float32)
  samples = [np.sort(np.subtract(m[idx].astype(np.float32), b_s).view(np.uint32) & np.uint32(0x7FFFFFFF))
             for m in ms]  # ascending
  firsts = [select.bracket_ends(n, k, s) for k, s in zip(k_M, samples)]

  def cap(sample, lo, hi):  # room for the entries inside the bracket, from the sample's share
    inside = np.searchsorted(sample, hi, "left") - np.searchsorted(sample, lo, "right")
    return int(1.25 * max(inside, 0) / sample.size * n) + 4096

  got = tau_select.brackets(ms, b_n, *zip(*firsts), [cap(s, *f) for s, f in zip(samples, firsts)])
  finite = None if got is None else got[2] == 0
  for j, (m, k, sample) in enumerate(zip(ms, k_M, samples)):
    found = {}

    def counts(lo, hi, j=j, m=m, sample=sample):
      if got is not None and (lo, hi) == firsts[j]:
        c3, cand = got[0][j], got[1][j]
      else:  # a widened bracket (or an overflowed first pass): this model alone, with room
        one = tau_select.brackets([m], b_n, [lo], [hi], [cap(sample, lo, hi)])
        one = one or tau_select.brackets([m], b_n, [lo], [hi], [n])
        c3, cand = one[0][0], one[1][0]
      found["inside"] = cand, int(c3[2])
      return int(c3[0]), int(c3[1])

    thr, n_gt, n_eq = select.kth_largest_in_bracket(n, k, sample, counts, lambda lo, hi: found["inside"])
    thr_N[slots[j]] = thr
    cut_N[slots[j]] = -1 if thr == 0 else (n - 1 if k - n_gt == n_eq else
                                           tau_select.tie_index(m, b_n, thr, k - n_gt))
  return finite


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
