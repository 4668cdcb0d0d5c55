"""Elementwise merge methods: linear, task arithmetic, the TIES/DARE/Breadcrumbs/DELLA family,
SLERP, Model Stock and Consensus (TALL masks).

Each public method is `method(base, models, **hparams)` over params trees or single
arrays; defaults are mergekit 0.1.5's (hyper-parameters and differences from mergekit /
FusionBench: docs/merging.md, "Methods and hyper-parameters"). Common keyword arguments of every method:
  rules       path -> rule table (h3jax.merging.rules): per-tensor overrides,
              keep_base / exclude, batch_dims;
  lora_scale  scale used to fold lora_a/lora_b leaves into kernels first;
  lambda_     (or `**{"lambda": x}`) global scale of the merged delta.
Per-model values (weight, density, gamma, epsilon, tall_lambda) are a scalar or a
sequence aligned with `models`; any of them may be a mergekit layer gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from h3jax.merging import blocks
from h3jax.merging import select
from h3jax.merging import tree as tree_lib
from h3jax.merging.tree import common_kwargs, pop_lambda


def _in_axis_hp(in_axis, default: int = 1):
  """mergekit ranks (DELLA: dim 1) / normalises (Model Stock: dim -1) along the input axis of
  HF [out, in] weights, which is axis 0 of h3jax [in, out] kernels."""
  if in_axis is not None:
    return lambda path, j: {"in_axis": in_axis}
  return lambda path, j: {"in_axis": 0 if path.endswith("kernel") else default}


# ----------------------------------------------------------------------------- linear / task arithmetic family

def _linear_array(base_X, models_NX, key, *, weight, normalize):
  out_X = blocks.weighted_sum(models_NX, weight)
  if normalize:
    out_X = out_X / jnp.sum(jnp.asarray(weight, jnp.float32))
  return out_X


def linear(base, models, *, weight=1.0, normalize=True, **kw):
  """Weight averaging / model soup: sum w_i theta_i / sum w_i. `base` is ignored (may be None);
  list it in `models` to include it."""
  pop_lambda("linear", 1.0, dict(kw))
  return tree_lib.merge_tree(_linear_array, None, models, name="linear",
                             hparams=dict(weight=weight, normalize=bool(normalize)),
                             per_model_keys=("weight",), needs_base=False, **common_kwargs(kw))


def gta_array(base_X, models_NX, key, *, weight, lambda_, normalize, sparsify=None, density=None,
               gamma=None, epsilon=None, rescale=None, consensus=None, in_axis=1, cuts=None):
  """mergekit GeneralizedTaskArithmeticMerge on one tensor.

  cuts: optional precomputed magnitude top-k cuts (thr_N, cutoff_N) from
  `select.np_topk_cut` (the streaming driver computes them on the host).
  """
  deltas = [m_X - base_X for m_X in blocks.unstack(models_NX)]  # task vectors, kept per model
  n = len(deltas)
  keys = None if key is None else jax.random.split(key, n)
  out = []
  for i in range(n):
    d_X = deltas[i]
    if sparsify is not None and density[i] < 1:
      keep_prob = None
      if sparsify == "magnitude" and cuts is not None:
        mask_X = select.mask_from_cut(d_X, cuts[0][i], cuts[1][i])
      elif sparsify == "magnitude":
        mask_X = blocks.topk_mask(d_X, density[i])
      elif sparsify == "random":
        mask_X = blocks.bernoulli_mask(keys[i], d_X.shape, density[i])
        keep_prob = density[i]
      elif sparsify == "outliers":
        mask_X = blocks.outlier_mask(d_X, density[i], gamma[i])
      elif sparsify == "della":
        keep_prob = blocks.della_keep_probs(d_X, density[i], epsilon[i], in_axis)
        mask_X = jax.random.bernoulli(keys[i], keep_prob)
      else:
        raise ValueError(f"unknown sparsification {sparsify!r}")
      d_X = blocks.sparsify(d_X, mask_X, rescale, keep_prob)
    out.append(d_X)
  return blocks.combine(base_X, out, weight, lambda_=lambda_, normalize=normalize,
                        consensus=consensus)


def gta_merge(name, base, models, kw, *, weight, lambda_, normalize, density=None, gamma=None,
         epsilon=None, sparsify=None, rescale=None, consensus=None, seed=None, in_axis=None):
  """mergekit's generalized task arithmetic over params trees (`gta_array` per tensor): the shared body
  of task arithmetic, TIES, DARE, Breadcrumbs and DELLA, which differ only in these switches."""
  lambda_ = pop_lambda(name, lambda_, kw)
  hp = dict(weight=weight, lambda_=float(lambda_), normalize=bool(normalize), sparsify=sparsify,
            rescale=rescale, consensus=consensus)
  per_model = ["weight"]
  for k, v in (("density", density), ("gamma", gamma), ("epsilon", epsilon)):
    if v is not None:
      hp[k] = v
      per_model.append(k)
  if density is not None:
    tree_lib.check_density(name, density if isinstance(density, (list, tuple)) else [density])
  extra = _in_axis_hp(in_axis) if sparsify == "della" else None
  return tree_lib.merge_tree(gta_array, base, models, name=name, hparams=hp,
                             per_model_keys=tuple(per_model), seed=seed, extra_leaf_hp=extra,
                             **common_kwargs(kw))


def _rescale_mode(rescale, mode):
  if not rescale:
    return None
  if mode == "mergekit":
    return "l1"
  if mode in ("fusion_bench", "paper"):
    return "inverse"
  raise ValueError(f"mode must be 'mergekit', 'paper' or 'fusion_bench', got {mode!r}")


def task_arithmetic(base, models, *, weight=1.0, lambda_=1.0, normalize=False, **kw):
  """theta_0 + lambda * sum_i w_i tau_i (normalize: divide by sum w). FusionBench:
  lambda_ = scaling_factor (default there 0.3), weights 1."""
  return gta_merge("task_arithmetic", base, models, kw, weight=weight, lambda_=lambda_,
              normalize=normalize)


def dare_linear(base, models, *, weight=1.0, density=1.0, lambda_=1.0, normalize=False,
                rescale=True, mode="mergekit", seed=0, **kw):
  """DARE + task arithmetic: Bernoulli(density) keep mask per tensor and model, rescaled by
  L1-norm matching (mode='mergekit', 0.1.5) or 1/density (mode='paper'|'fusion_bench')."""
  return gta_merge("dare_linear", base, models, kw, weight=weight, lambda_=lambda_, normalize=normalize,
              density=density, sparsify="random", rescale=_rescale_mode(rescale, mode), seed=seed)


def dare_ties(base, models, *, weight=1.0, density=1.0, lambda_=1.0, normalize=False,
              rescale=True, mode="mergekit", seed=0, **kw):
  """DARE masks, then TIES sign election and (normalize=False) disjoint sum."""
  return gta_merge("dare_ties", base, models, kw, weight=weight, lambda_=lambda_, normalize=normalize,
              density=density, sparsify="random", rescale=_rescale_mode(rescale, mode),
              consensus="mergekit" if mode == "mergekit" else "fusion_bench", seed=seed)


def breadcrumbs(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_=1.0,
                normalize=False, rescale=False, **kw):
  """Model Breadcrumbs: per tensor drop the top-gamma outliers and the smallest values."""
  return gta_merge("breadcrumbs", base, models, kw, weight=weight, lambda_=lambda_, normalize=normalize,
              density=density, gamma=gamma, sparsify="outliers",
              rescale="l1" if rescale else None)


def breadcrumbs_ties(base, models, *, weight=1.0, density=1.0, gamma=0.01, lambda_=1.0,
                     normalize=False, rescale=False, **kw):
  """Breadcrumbs masks + TIES sign election."""
  return gta_merge("breadcrumbs_ties", base, models, kw, weight=weight, lambda_=lambda_,
              normalize=normalize, density=density, gamma=gamma, sparsify="outliers",
              rescale="l1" if rescale else None, consensus="mergekit")


def della(base, models, *, weight=1.0, density=1.0, epsilon=0.15, lambda_=1.0, normalize=True,
          rescale=True, mode="mergekit", seed=0, in_axis=None, **kw):
  """DELLA: magnitude-ranked keep probabilities (d - eps .. d + eps) per row, TIES election.
  in_axis: axis ranked within a row (default: 0 for h3jax `kernel` leaves, 1 otherwise,
  i.e. mergekit's dim 1 of HF [out, in] weights)."""
  return gta_merge("della", base, models, kw, weight=weight, lambda_=lambda_, normalize=normalize,
              density=density, epsilon=epsilon, sparsify="della",
              rescale=_rescale_mode(rescale, mode), consensus="mergekit", seed=seed,
              in_axis=in_axis)


def della_linear(base, models, *, weight=1.0, density=1.0, epsilon=0.15, lambda_=1.0,
                 normalize=False, rescale=True, mode="mergekit", seed=0, in_axis=None, **kw):
  """DELLA masks + task arithmetic (no sign election)."""
  return gta_merge("della_linear", base, models, kw, weight=weight, lambda_=lambda_,
              normalize=normalize, density=density, epsilon=epsilon, sparsify="della",
              rescale=_rescale_mode(rescale, mode), seed=seed, in_axis=in_axis)


# ----------------------------------------------------------------------------- SLERP, Model Stock

def _slerp_array(base_X, models_NX, key, *, t, dot_threshold=0.9995, eps=1e-8):
  a_n, b_n = base_X.reshape(-1), models_NX[0].reshape(-1)
  if a_n.size == 0:
    return base_X
  na, nb = jnp.linalg.norm(a_n), jnp.linalg.norm(b_n)
  na, nb = jnp.where(na > eps, na, 1.0), jnp.where(nb > eps, nb, 1.0)
  dot = jnp.clip(jnp.sum((a_n / na) * (b_n / nb)), -1, 1)
  lin = jnp.abs(dot) > dot_threshold
  theta = jnp.arccos(jnp.where(lin, 0.0, dot))
  sin_theta = jnp.where(lin, 1.0, jnp.sin(theta))
  ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
  cb = jnp.where(lin, t, jnp.sin(t * theta) / sin_theta)
  return ca * base_X + cb * models_NX[0]


def slerp(base, models, *, t=None, dot_threshold=0.9995, eps=1e-8, **kw):
  """Spherical interpolation of the raw weights, one angle per tensor; t=0 is the base.
  Exactly one model besides the base (mergekit). t may be a layer gradient."""
  pop_lambda("slerp", 1.0, dict(kw))
  if t is None:
    raise ValueError("slerp needs the interpolation factor t")
  return tree_lib.merge_tree(_slerp_array, base, models, name="slerp",
                             hparams=dict(t=t, dot_threshold=float(dot_threshold), eps=float(eps)),
                             min_models=1, max_models=1, **common_kwargs(kw))


def _model_stock_array(base_X, models_NX, key, *, filter_wise=False, angle_avg="cos", in_axis=1):
  n = models_NX.shape[0]
  shape = base_X.shape
  if filter_wise:
    w0 = base_X[None] if base_X.ndim == 1 else jnp.moveaxis(base_X, in_axis, -1)
    ax = in_axis % base_X.ndim if base_X.ndim > 1 else 0
    ws = models_NX[:, None] if base_X.ndim == 1 else jnp.moveaxis(models_NX, ax + 1, -1)
  else:
    w0, ws = base_X.reshape(-1), models_NX.reshape(n, -1)
  off = ws - w0[None]
  cos = []
  for i in range(n):
    for j in range(i + 1, n):
      nrm = jnp.linalg.norm(off[i], axis=-1) * jnp.linalg.norm(off[j], axis=-1)
      cos.append(jnp.clip(jnp.sum(off[i] * off[j], axis=-1) / jnp.maximum(nrm, 1e-6), -1, 1))
  cos = jnp.stack(cos)
  if angle_avg == "cos":
    c = jnp.mean(cos, axis=0)
  elif angle_avg == "deg":
    c = jnp.cos(jnp.deg2rad(jnp.mean(jnp.rad2deg(jnp.arccos(cos)), axis=0)))
  else:
    raise ValueError(f"angle_avg must be 'cos' (mergekit) or 'deg' (fusion_bench), got {angle_avg!r}")
  c = c[..., None]
  den = 1 + (n - 1) * c
  singular = jnp.abs(den) < 1e-6
  t = jnp.where(singular, 0.0, n * c / jnp.where(singular, 1.0, den))
  out = t * blocks.mean_models(ws) + (1 - t) * w0
  if filter_wise and base_X.ndim > 1:
    out = jnp.moveaxis(out, -1, in_axis)
  return out.reshape(shape)


def model_stock(base, models, *, filter_wise=False, angle_avg="cos", in_axis=None, **kw):
  """Model Stock: t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of task vectors;
  theta = t mean(theta_i) + (1 - t) theta_0. angle_avg='deg' averages angles (FusionBench)."""
  pop_lambda("model_stock", 1.0, dict(kw))
  return tree_lib.merge_tree(_model_stock_array, base, models, name="model_stock",
                             hparams=dict(filter_wise=bool(filter_wise), angle_avg=angle_avg),
                             min_models=2, extra_leaf_hp=_in_axis_hp(in_axis, -1), **common_kwargs(kw))


# ----------------------------------------------------------------------------- Consensus (TALL masks)

def _consensus_array(base_X, models_NX, key, *, weight, tall_lambda, k, lambda_, normalize,
                     density=None, ties=False):
  deltas_NX = blocks.task_vectors(base_X, models_NX)
  mixed_NX = deltas_NX
  if ties and density is not None:
    mixed_NX = jnp.stack([jnp.where(blocks.topk_mask(d, p), d, 0.0) for d, p in zip(deltas_NX, density)])
  merged_X = blocks.combine(jnp.zeros_like(base_X), mixed_NX, weight, normalize=normalize,
                            consensus="mergekit" if ties else None)
  # TALL masks compare each raw (unweighted, untrimmed) task vector with the merged delta.
  masks_NX = blocks.tall_masks(deltas_NX, merged_X, tall_lambda, strict=True)
  keep_X = blocks.sum_models(masks_NX.astype(jnp.int32)) >= k
  return base_X + lambda_ * jnp.where(keep_X, merged_X, 0.0)


def consensus_ta(base, models, *, weight=1.0, tall_lambda=1.0, k=1, lambda_=1.0,
                 normalize=False, **kw):
  """Consensus merging over task arithmetic, mergekit 0.0.6 semantics: merged = weighted
  (optionally normalised) sum of task vectors; TALL masks |tau_t| > tall_lambda_t |merged - tau_t|;
  entries kept where >= k masks agree (mergekit's default k = 1; the paper uses 2). mergekit
  0.0.6 calls tall_lambda `lambda`; lambda_ here is an extra global scale (1 = mergekit)."""
  lambda_ = pop_lambda("consensus_ta", lambda_, kw)
  return tree_lib.merge_tree(_consensus_array, base, models, name="consensus_ta",
                             hparams=dict(weight=weight, tall_lambda=tall_lambda, k=int(k),
                                          lambda_=float(lambda_), normalize=bool(normalize)),
                             per_model_keys=("weight", "tall_lambda"), **common_kwargs(kw))


def consensus_ties(base, models, *, weight=1.0, density=1.0, tall_lambda=1.0, k=1, lambda_=1.0,
                   normalize=True, **kw):
  """Consensus merging over TIES (per-tensor magnitude trim, sign election, normalize on);
  the TALL masks use the untrimmed task vectors (mergekit 0.0.6)."""
  lambda_ = pop_lambda("consensus_ties", lambda_, kw)
  tree_lib.check_density("consensus_ties", density if isinstance(density, (list, tuple)) else [density])
  return tree_lib.merge_tree(_consensus_array, base, models, name="consensus_ties",
                             hparams=dict(weight=weight, tall_lambda=tall_lambda, k=int(k),
                                          lambda_=float(lambda_), normalize=bool(normalize),
                                          density=density, ties=True),
                             per_model_keys=("weight", "tall_lambda", "density"), **common_kwargs(kw))
