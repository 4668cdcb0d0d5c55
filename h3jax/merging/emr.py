"""EMR-merging (Huang 2024): Elect, Mask & Rescale, in FusionBench 0.2.33 semantics.

flag = sign(sum_t tau_t) with zeros counted as negative; tau_uni = flag * max_t |tau_t|
over entries that agree with flag; mask M_t = [tau_t * flag > 0]; rescaler
lambda_t = sum_keys mean|tau_t| / sum_keys mean|M_t * tau_uni| (one scalar per task
over the whole model, each HF tensor one key). The result is task-specific:
theta_t = theta_0 + lambda_t * M_t * tau_uni.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from h3jax.merging import blocks
from h3jax.merging import tree as tree_lib
from h3jax.merging.tree import common_kwargs, pop_lambda


def emr_flag(deltas_NX):
  """FusionBench `_sign` of the summed task vectors: +1 where > 0, else -1."""
  return jnp.where(blocks.sum_models(deltas_NX) > 0, 1.0, -1.0)


def emr_tensor(base_X, models_NX):
  """One tensor's EMR pieces: (tau_uni [X], mean|tau_t| [T], mean|M_t tau_uni| [T]).
  Rescalers = (sum over tensors of the 2nd) / (sum of the 3rd), e.g. in a streaming pass."""
  out, aux = _emr_unified_array(base_X, models_NX, None)
  return out - base_X, aux["abs_mean"], aux["masked_abs_mean"]


def _emr_unified_array(base_X, models_NX, key):
  """theta_0 + tau_uni, with per-task (mean|tau_t|, mean|M_t tau_uni|) as aux."""
  deltas_NX = blocks.task_vectors(base_X, models_NX)
  flag_X = emr_flag(deltas_NX)
  mask_NX = deltas_NX * flag_X[None] > 0
  uni_X = blocks.max_models(jnp.abs(jnp.where(mask_NX, deltas_NX, 0.0))) * flag_X
  red = tuple(range(1, deltas_NX.ndim))
  aux = {"abs_mean": jnp.mean(jnp.abs(deltas_NX), axis=red),
         "masked_abs_mean": jnp.mean(jnp.abs(jnp.where(mask_NX, uni_X[None], 0.0)), axis=red)}
  return base_X + uni_X, aux


def emr(base, models, *, return_parts=False, **kw):
  """EMR: returns the list of task-specific models [theta_t] (one per input model, in the
  input's tree structure and dtypes), or with return_parts a dict
  {unified: tau_uni tree (float32), masks: [bool trees], rescalers: float32 [T]}."""
  pop_lambda("emr", None, dict(kw))
  unified, aux = tree_lib.merge_tree(_emr_unified_array, base, models, name="emr", hparams={},
                                     with_aux=True, **common_kwargs(kw))
  n = len(models)
  scales, new_scales = jnp.zeros(n), jnp.zeros(n)
  for a in aux.values():
    # Stacked leaves return [*batch, T]: every slice is its own key.
    scales = scales + a["abs_mean"].reshape(-1, n).sum(0)
    new_scales = new_scales + a["masked_abs_mean"].reshape(-1, n).sum(0)
  rescalers = scales / jnp.where(new_scales == 0, 1.0, new_scales)  # [T]
  base_f = tree_lib.fold_lora(base, kw.get("lora_scale", 1.0))
  uni = jax.tree.map(lambda u, b: u.astype(jnp.float32) - b.astype(jnp.float32), unified, base_f)
  models_f = [tree_lib.fold_lora(m, kw.get("lora_scale", 1.0)) for m in models]
  masks = [jax.tree.map(lambda u, m, b: (m.astype(jnp.float32) - b.astype(jnp.float32)) * jnp.sign(u) > 0,
                        uni, m, base_f) for m in models_f]
  if return_parts:
    return {"unified": uni, "masks": masks, "rescalers": rescalers}
  return [jax.tree.map(lambda b, u, mk: (b.astype(jnp.float32) + rescalers[t] * jnp.where(mk, u, 0.0)
                                         ).astype(b.dtype), base_f, uni, mask)
          for t, mask in enumerate(masks)]
