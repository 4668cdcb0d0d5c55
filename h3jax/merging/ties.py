"""TIES merging in mergekit 0.1.5 and FusionBench 0.2.33 semantics.

mode='mergekit' (default): per tensor keep exactly max(1, int(density*numel)) largest
|tau_i|; weighted deltas vote (+1 where sum >= 0); weighted disjoint mean
(normalize=True) or sum; theta_0 + lambda * delta.
mode='fusion_bench': keep |tau_i| >= the model's k-th largest magnitude over the
whole model (trim_scope='global'; 'tensor' for per-tensor), sign(sum) with zeros
taking the majority, merge_func 'sum' (default) | 'mean' | 'max'; FusionBench's
`threshold` (percent kept) = 100 * density and `scaling_factor` = lambda_
(FusionBench's default is 0.3; ours is 1.0).
Zero-sign resolution is per tensor here; it only affects entries whose trimmed
deltas are all zero, so the output equals FusionBench's global resolution.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from h3jax.merging import blocks
from h3jax.merging import rules as rules_lib
from h3jax.merging import tree as tree_lib
from h3jax.merging.basic import gta_merge
from h3jax.merging.tree import common_kwargs, pop_lambda


def _ties_fb_array(base_X, models_NX, key, *, weight, density, lambda_, merge_func,
                   thresholds=None):
  deltas_NX = blocks.task_vectors(base_X, models_NX)
  trimmed = []
  for i in range(deltas_NX.shape[0]):
    d_X = deltas_NX[i]
    if density[i] < 1:
      thr = (blocks.kth_largest_threshold(d_X, density[i]) if thresholds is None
             else thresholds[i])
      d_X = jnp.where(blocks.threshold_mask(d_X, thr), d_X, 0.0)
    trimmed.append(d_X * weight[i])
  trimmed_NX = jnp.stack(trimmed)
  sign_X = blocks.elect_sign(trimmed_NX, "fusion_bench")
  mask_NX = blocks.agree_mask(trimmed_NX, sign_X)
  return base_X + lambda_ * blocks.disjoint_merge(trimmed_NX, mask_NX, None, merge_func)


def global_thresholds(base, models, density, *, rules=None, lora_scale: float = 1.0) -> tuple:
  """Per model, FusionBench's k-th largest |tau| over all merged (not kept/excluded) leaves."""
  models = tree_lib.check_models("ties", base, models, needs_base=True)
  n = len(models)
  density = rules_lib.per_model("density", density, n)
  table = rules_lib.validate_rules(rules)
  base = tree_lib.fold_lora(base, lora_scale)
  leaves = tree_lib.leaves_with_paths(base)
  model_leaves = [[x for _, x in tree_lib.leaves_with_paths(tree_lib.fold_lora(m, lora_scale))]
                  for m in models]
  out = []
  for i in range(n):
    parts = []
    for j, (path, b) in enumerate(leaves):
      hp = rules_lib.resolve(path, table, {})
      if hp.get("keep_base") or hp.get("exclude"):
        continue
      parts.append(np.abs(np.asarray(model_leaves[i][j], np.float32) - np.asarray(b, np.float32)).ravel())
    flat = np.concatenate(parts) if parts else np.zeros((1,), np.float32)
    if density[i] >= 1:
      out.append(float(flat.min()))
      continue
    k = flat.size - int(flat.size * density[i])
    out.append(float(np.partition(flat, k - 1)[k - 1]) if k > 0 else float(flat.min()))
  return tuple(out)


def ties(base, models, *, weight=1.0, density=1.0, lambda_=1.0, normalize=True, rescale=False,
         mode="mergekit", merge_func="sum", trim_scope=None, thresholds=None, **kw):
  """TIES-merging (trim, elect sign, disjoint merge); see the module docstring for modes.

  thresholds: precomputed per-model magnitude thresholds (fusion_bench mode), e.g. from
  `global_thresholds` over a whole model when merging tensor by tensor.
  """
  if mode == "mergekit":
    return gta_merge("ties", base, models, kw, weight=weight, lambda_=lambda_, normalize=normalize,
                density=density, sparsify="magnitude", rescale="l1" if rescale else None,
                consensus="mergekit")
  if mode != "fusion_bench":
    raise ValueError(f"ties: mode must be 'mergekit' or 'fusion_bench', got {mode!r}")
  lambda_ = pop_lambda("ties", lambda_, kw)
  if merge_func not in ("sum", "mean", "max"):
    raise ValueError(f"ties: merge_func must be sum|mean|max, got {merge_func!r}")
  tree_lib.check_density("ties", density if isinstance(density, (list, tuple)) else [density])
  trim_scope = trim_scope or "global"
  if trim_scope not in ("global", "tensor"):
    raise ValueError(f"ties: trim_scope must be 'global' or 'tensor', got {trim_scope!r}")
  if thresholds is None and trim_scope == "global":
    thresholds = global_thresholds(base, models, density, rules=kw.get("rules"),
                                   lora_scale=kw.get("lora_scale", 1.0))
  hp = dict(weight=weight, density=density, lambda_=float(lambda_), merge_func=merge_func)
  if thresholds is not None:
    hp["thresholds"] = tuple(float(t) for t in thresholds)
  return tree_lib.merge_tree(_ties_fb_array, base, models, name="ties", hparams=hp,
                             per_model_keys=("weight", "density"), **common_kwargs(kw))
