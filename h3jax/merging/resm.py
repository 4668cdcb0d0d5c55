"""RESM (Yang et al., arXiv 2502.06876): TSV-M + outlier weighting + sparsity-aware ranks.

RECONSTRUCTION. The paper's equations were not available; this implements the
parametrised proposal below (knob table: docs/merging.md, "RESM"). Every knob is an argument and
the DEFAULTS (rank_mode='tsvm', outlier_mode='none') REDUCE EXACTLY TO TSV-M
(`h3jax.merging.tsv_m`, same code path, bit-identical).

Per 2-D tensor l (m x n, r = min(m, n)), tau_t = theta_t - theta_0:
A. rank_mode='tsvm' (alias 'uniform'): every task keeps floor(r / T) triples, as TSV-M.
   rank_mode='sparsity': sp_l = mean_t frac(|tau_t| <= eps_sp * max|tau_t|);
   z_l = sp_l min-max normalised over all 2-D tensors of the model; per-task rank
   k_l = clip(round(r * (1 - lambda_r * z_l) / T), 1, floor(r / T)) (sparser -> fewer).
B. outlier_mode='sv': robust z-score of the concatenated kept singular values,
   z_i = (s_i - median) / (1.4826 MAD); weight 1 if z_i <= kappa else (kappa / z_i)^gamma.
   The median and MAD are taken over the numerically significant values only, s_i > sv_rtol * max s
   (default 1e-3): a LoRA expert's rank-r task vector has r real singular values and float32
   rounding (~1e-5 s_max) in the rest, which would set the median and make every real one an
   "outlier" (on the quickstart's r=8 experts that scaled the merge to 1e-4 of TSV-M's).
   outlier_mode='param': before the SVD, entries with |tau_t| > M mean|tau_t| are
   shrunk to sign * (M mean|tau_t| + beta (|tau_t| - M mean|tau_t|)).
C. Delta = polar(U_hat) diag(w * s_hat) polar(V_hat)^T; theta = theta_0 + alpha Delta.
D. 1-D tensors / excluded keys: alpha * mean(tau), as TSV-M.
Returns per-tensor stats with return_stats=True (and logs a summary): the per-task
rank k used, the layer sparsity, and the outlier fraction / mean weight.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.merging import blocks
from h3jax.merging import rules as rules_lib
from h3jax.merging import svd as svd_lib
from h3jax.merging import tree as tree_lib
from h3jax.merging.tree import common_kwargs, pop_lambda

# 'uniform' is the RESM paper's word for TSV-M's equal per-task rank.
RANK_MODES = {"tsvm": "tsvm", "uniform": "tsvm", "sparsity": "sparsity"}
OUTLIER_MODES = ("none", "sv", "param")

log = logging.getLogger(__name__)


def layer_sparsity(deltas_NMN, eps_sp: float):
  """mean_t fraction of |tau_t| <= eps_sp * max|tau_t|."""
  a_NMN = jnp.abs(deltas_NMN)
  thr_N11 = eps_sp * jnp.max(a_NMN, axis=(1, 2), keepdims=True)
  return jnp.mean(jnp.mean(a_NMN <= thr_N11, axis=(1, 2)))


def shrink_outliers(tau_X, M: float, beta: float):
  """OWL-style soft clipping of entries above M * mean|tau|; returns (tau', outlier fraction)."""
  a_X = jnp.abs(tau_X)
  thr = M * jnp.mean(a_X)
  out_X = a_X > thr
  return jnp.where(out_X, jnp.sign(tau_X) * (thr + beta * (a_X - thr)), tau_X), jnp.mean(out_X)


def sv_outlier_weights(s_K, keep_K, kappa: float, gamma: float, sv_rtol: float = 0.0):
  """Robust z-score weights over the kept singular values above sv_rtol * their max (others get
  weight 1)."""
  keep_K = keep_K & (s_K > sv_rtol * jnp.max(jnp.where(keep_K, s_K, 0.0)))
  vals_K = jnp.where(keep_K, s_K, jnp.nan)
  med = jnp.nanmedian(vals_K)
  mad = jnp.nanmedian(jnp.abs(vals_K - med))
  z_K = jnp.where(mad > 0, (s_K - med) / (1.4826 * jnp.where(mad > 0, mad, 1.0)), 0.0)
  w_K = jnp.where(z_K <= kappa, 1.0, (kappa / jnp.maximum(z_K, 1e-30)) ** gamma)
  return jnp.where(keep_K, w_K, 1.0)


def _resm_array(base_X, models_NX, key, *, alpha=1.0, rank_mode="tsvm", eps_sp=1e-3,
                lambda_r=0.3, sp_range=(0.0, 0.0), outlier_mode="none", kappa=3.0, gamma=1.0, sv_rtol=1e-3,
                M=5.0, beta=0.5, rank_cap=None, rank_rtol=1e-5, solver="auto"):
  n = models_NX.shape[0]
  if base_X.ndim != 2:
    out = svd_lib.mean_delta_array(base_X, models_NX, key, alpha=alpha)
    nan = jnp.float32(jnp.nan)
    return out, {"rank": jnp.int32(0), "sparsity": nan, "outlier_fraction": nan, "mean_weight": nan}
  if rank_mode == "tsvm" and outlier_mode == "none":
    out = svd_lib._tsvm_array(base_X, models_NX, key, alpha=alpha, rank_cap=rank_cap,
                              rank_rtol=rank_rtol, solver=solver)
    r = min(base_X.shape)
    return out, {"rank": jnp.int32(r // n), "sparsity": jnp.float32(jnp.nan),
                 "outlier_fraction": jnp.float32(0.0), "mean_weight": jnp.float32(1.0)}
  deltas_NMN, scale = svd_lib._scale_tasks(blocks.task_vectors(base_X, models_NX), alpha)
  r = min(base_X.shape)
  kmax = int(r * (1 / n))
  if kmax == 0:
    return base_X, {"rank": jnp.int32(0), "sparsity": jnp.float32(jnp.nan),
                    "outlier_fraction": jnp.float32(0.0), "mean_weight": jnp.float32(1.0)}
  sp = layer_sparsity(deltas_NMN, eps_sp)
  outlier_frac = jnp.float32(0.0)
  if outlier_mode == "param":
    shrunk = [shrink_outliers(d, M, beta) for d in deltas_NMN]
    deltas_NMN = jnp.stack([d for d, _ in shrunk])
    outlier_frac = jnp.mean(jnp.stack([f for _, f in shrunk]))
  if rank_mode == "sparsity":
    lo, hi = sp_range
    z = jnp.clip(jnp.where(hi > lo, (sp - lo) / (hi - lo if hi > lo else 1.0), 0.0), 0.0, 1.0)
    k = jnp.clip(jnp.round(r * (1 - lambda_r * z) / n), 1, kmax).astype(jnp.int32)
  else:  # 'tsvm' (resm() checked the modes before any tensor)
    k = jnp.int32(kmax)
  keep_TK = jnp.broadcast_to(jnp.arange(kmax) < k, (n, kmax))
  if rank_cap == "numerical":
    keep_TK = keep_TK & jnp.stack(
        [blocks.numerical_rank_mask(blocks.svd(d)[1], rank_rtol)[:kmax] for d in deltas_NMN])
  method = svd_lib._check_solver("resm", solver)
  u_MK, s_K, v_NK = svd_lib.tsv_factors(deltas_NMN, kmax, keep_TK, method)  # K = T * kmax
  keep_K = keep_TK.reshape(-1) & (s_K > 0)  # dropped triples (zero tasks, rank caps) have no weight
  w_K = jnp.ones_like(s_K)
  if outlier_mode == "sv":
    w_K = sv_outlier_weights(s_K, keep_K, kappa, gamma, sv_rtol)
    outlier_frac = jnp.sum((w_K < 1) & keep_K) / jnp.maximum(jnp.sum(keep_K), 1)
  out = base_X + scale * svd_lib.tsv_combine(u_MK, w_K * s_K, v_NK, method)
  mean_w = jnp.sum(jnp.where(keep_K, w_K, 0.0)) / jnp.maximum(jnp.sum(keep_K), 1)
  return out, {"rank": k, "sparsity": sp, "outlier_fraction": outlier_frac, "mean_weight": mean_w}


def sparsity_range(base, models, eps_sp: float, rules=None, lora_scale: float = 1.0):
  """(min, max) layer sparsity over all merged 2-D tensors (layers unstacked)."""
  models = tree_lib.check_models("resm", base, models, needs_base=True)
  table = rules_lib.validate_rules(rules)
  base = tree_lib.fold_lora(base, lora_scale)
  mls = [[x for _, x in tree_lib.leaves_with_paths(tree_lib.fold_lora(m, lora_scale))] for m in models]
  vals = []
  for j, (path, b) in enumerate(tree_lib.leaves_with_paths(base)):
    hp = rules_lib.resolve(path, table, {})
    if hp.get("keep_base") or hp.get("exclude"):
      continue
    bd = hp.get("batch_dims", rules_lib.default_batch_dims(path))
    if b.ndim - bd != 2:
      continue
    d = np.stack([np.asarray(ml[j], np.float32) for ml in mls]) - np.asarray(b, np.float32)[None]
    d = d.reshape((d.shape[0], -1) + d.shape[-2:]).transpose(1, 0, 2, 3)  # [slices, T, m, n]
    for sl in d:
      vals.append(float(layer_sparsity(jnp.asarray(sl), eps_sp)))
  return (min(vals), max(vals)) if vals else (0.0, 0.0)


def resm(base, models, *, alpha=1.0, rank_mode="tsvm", eps_sp=1e-3, lambda_r=0.3,
         outlier_mode="none", kappa=3.0, gamma=1.0, sv_rtol=1e-3, M=5.0, beta=0.5, rank_cap=None,
         rank_rtol=1e-5, sp_range=None, solver="auto", return_stats=False, **kw):
  """RESM (reconstruction; defaults == TSV-M). See the module docstring for every knob.

  sp_range: precomputed (min, max) layer sparsity for rank_mode='sparsity' (the
  tensor-by-tensor driver computes it in a first pass); computed here when None.
  solver: as `tsv_m`'s ('auto' | 'svd' | 'gram').
  return_stats: also return {path: {rank, sparsity, outlier_fraction, mean_weight}}
  (arrays over stacked layers).
  """
  pop_lambda("resm", None, dict(kw))
  rank_mode = RANK_MODES.get(rank_mode, rank_mode)
  if rank_mode not in RANK_MODES.values():
    raise ValueError(f"resm: rank_mode must be one of {sorted(RANK_MODES)}, got {rank_mode!r}")
  svd_lib._check_rank_cap("resm", rank_cap)
  if outlier_mode not in OUTLIER_MODES:
    raise ValueError(f"resm: outlier_mode must be one of {list(OUTLIER_MODES)}, got {outlier_mode!r}")
  if not 0.0 <= lambda_r < 1.0:
    raise ValueError(f"resm: lambda_r must be in [0, 1), got {lambda_r}")
  if not 0.0 <= sv_rtol < 1.0:
    raise ValueError(f"resm: sv_rtol must be in [0, 1), got {sv_rtol}")
  if rank_mode == "sparsity" and sp_range is None:
    sp_range = sparsity_range(base, models, eps_sp, kw.get("rules"), kw.get("lora_scale", 1.0))
  hp = dict(alpha=svd_lib._alpha(alpha), rank_mode=rank_mode, eps_sp=float(eps_sp),
            lambda_r=float(lambda_r), sp_range=tuple(float(x) for x in (sp_range or (0.0, 0.0))),
            outlier_mode=outlier_mode, kappa=float(kappa), gamma=float(gamma), sv_rtol=float(sv_rtol),
            M=float(M), beta=float(beta), rank_cap=rank_cap, rank_rtol=float(rank_rtol), solver=solver)
  merged, stats = tree_lib.merge_tree(_resm_array, base, models, name="resm", hparams=hp,
                                      exclude_fn=svd_lib.mean_delta_array, with_aux=True,
                                      **common_kwargs(kw))
  concrete = not any(isinstance(v, jax.core.Tracer) for s in stats.values() for v in s.values())
  if concrete:  # under an outer jit the stats stay traced arrays
    stats = {p: {k: np.asarray(v) for k, v in s.items()} for p, s in stats.items()}
    for p, s in stats.items():
      if np.all(s["rank"] > 0):
        log.info("resm %s: rank/task %s outlier_fraction %s", p, s["rank"].tolist(),
                 np.round(s["outlier_fraction"], 4).tolist())
  return (merged, stats) if return_stats else merged
