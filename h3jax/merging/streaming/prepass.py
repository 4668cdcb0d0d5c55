"""Whole-model statistics some streamed methods need, from extra streaming passes (O(tensor) memory)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def global_pre_passes(spec, plan, base, models):
  """Whole-model statistics some methods need, computed by streaming passes (O(tensor) memory).

  * ties mode='fusion_bench' (global trim): each model's exact k-th largest |tau| over
    all merged tensors, from two histogram passes over the float32 bit patterns;
  * resm rank_mode='sparsity': the (min, max) layer sparsity over all 2-D tensors.
  """
  merged = [(n, kw) for n, a, kw in plan if a == "merge"]
  if not merged or base is None:
    return plan
  kw0 = merged[0][1]
  extra = {}
  if _global_trim(spec, kw0):
    density = kw0.get("density", 1.0)
    density = density if isinstance(density, tuple) else (density,) * len(models)
    extra["thresholds"] = streaming_thresholds([n for n, _ in merged], base, models, density)
  if _sparsity_range(spec, kw0):
    from h3jax.merging.resm import layer_sparsity
    vals = []
    for name, kw in merged:
      if len(base.shape(name)) == 2 and 0 not in base.shape(name):
        d = np.stack([m.get(name).astype(np.float32) for m in models]) - base.get(name).astype(np.float32)
        vals.append(float(layer_sparsity(jnp.asarray(d), kw.get("eps_sp", 1e-3))))
    extra["sp_range"] = (min(vals), max(vals)) if vals else (0.0, 0.0)
  if not extra:
    return plan
  return [(n, a, {**kw, **extra} if a == "merge" else kw) for n, a, kw in plan]


def needs_pre_pass(spec, plan, base) -> bool:
  """Whether `global_pre_passes` reads the whole model (which it does without vocabulary alignment)."""
  merged = [kw for _, a, kw in plan if a == "merge"]
  return bool(merged) and base is not None and (_global_trim(spec, merged[0]) or _sparsity_range(spec, merged[0]))


def _global_trim(spec, kw0) -> bool:
  return spec.method == "ties" and kw0.get("mode") == "fusion_bench" and \
      kw0.get("trim_scope", "global") == "global" and "thresholds" not in kw0


def _sparsity_range(spec, kw0) -> bool:
  return spec.method == "resm" and kw0.get("rank_mode") == "sparsity" and "sp_range" not in kw0


def streaming_thresholds(names, base, models, density) -> tuple:
  """FusionBench's per-model threshold: the (n - int(n * density))-th smallest |tau| over
  the whole model, exactly, in two passes (|tau| as float32 bits sorts like uint32)."""
  n_models = len(models)
  total = 0
  hi = np.zeros((n_models, 1 << 16), np.int64)
  for name in names:
    b = base.get(name).astype(np.float32)
    total += b.size
    for i, m in enumerate(models):
      bits = np.abs(m.get(name).astype(np.float32) - b).view(np.uint32).ravel()
      hi[i] += np.bincount(bits >> 16, minlength=1 << 16)
  targets, bins = [], []
  for i in range(n_models):
    k = max(total - int(total * density[i]), 1)
    c = np.cumsum(hi[i])
    bin_i = int(np.searchsorted(c, k))
    targets.append(k - (int(c[bin_i - 1]) if bin_i else 0))
    bins.append(bin_i)
  lo = np.zeros((n_models, 1 << 16), np.int64)
  for name in names:
    b = base.get(name).astype(np.float32)
    for i, m in enumerate(models):
      bits = np.abs(m.get(name).astype(np.float32) - b).view(np.uint32).ravel()
      sel = bits[(bits >> 16) == bins[i]]
      lo[i] += np.bincount(sel & 0xFFFF, minlength=1 << 16)
  out = []
  for i in range(n_models):
    j = int(np.searchsorted(np.cumsum(lo[i]), targets[i]))
    out.append(float(np.array([(bins[i] << 16) | j], np.uint32).view(np.float32)[0]))
  return tuple(out)
