"""Data-dependent merges: Fisher merging (Matena & Raffel 2022) and RegMean (Jin 2023),
with the statistics computed by running the h3jax model.

Batches: an iterable of dicts {"input_ids": [B, T] int, optional "attention_mask"
[B, T] (1 = real token), optional "loss_mask" [B, T] (1 = token counts as a
target)}, or bare [B, T] arrays.

compute_fisher: diagonal empirical Fisher of the LM loss, F = mean over sequences of
  (grad_theta sum_t log p(x_{t+1} | x_<=t))^2 (per-sequence gradients, true labels).
compute_regmean_grams: for every linear kernel ([in, out]) the Gram of its inputs,
  G = X^T X / n_tokens over real tokens, as {path: [L, in, in] or [in, in]}
  (dense models; q/k/v share one input, as do gate/up).
LoRA leaves are folded into their kernels (cfg.lora_scale) first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from h3jax.config import ModelConfig
from h3jax.merging import blocks, tree as tree_lib
from h3jax.merging.tree import common_kwargs, pop_lambda
from h3jax.model import llama


def _batch_arrays(batch):
  if isinstance(batch, dict):
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = jnp.asarray(batch.get("attention_mask", jnp.ones(ids.shape)), jnp.float32)
    loss = jnp.asarray(batch.get("loss_mask", mask), jnp.float32) * mask
  else:
    ids = jnp.asarray(batch, jnp.int32)
    mask = loss = jnp.ones(ids.shape, jnp.float32)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, T], got shape {tuple(ids.shape)}")
  return ids, mask, loss


def _seq_loglik(params, ids_T, mask_T, loss_T, cfg):
  logits_TV = llama.forward(params, ids_T[None], cfg, attention_mask_BT=mask_T[None])[0]
  logp_TV = jax.nn.log_softmax(logits_TV[:-1].astype(jnp.float32), axis=-1)
  ll_T = jnp.take_along_axis(logp_TV, ids_T[1:, None], axis=-1)[:, 0]
  return jnp.sum(ll_T * loss_T[1:] * mask_T[:-1])


@functools.partial(jax.jit, static_argnames=("cfg",))
def _fisher_batch(params, ids_BT, mask_BT, loss_BT, cfg):
  grad = jax.grad(_seq_loglik)
  sq = jax.lax.map(lambda a: jax.tree.map(jnp.square, grad(params, *a, cfg)), (ids_BT, mask_BT, loss_BT))
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), sq)


def compute_fisher(params, cfg: ModelConfig, batches):
  """Diagonal empirical Fisher, a float32 tree like `params` (LoRA folded)."""
  params = tree_lib.fold_lora(params, cfg.lora_scale)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  total, n = None, 0
  for batch in batches:
    ids, mask, loss = _batch_arrays(batch)
    f = _fisher_batch(params, ids, mask, loss, cfg)
    total = f if total is None else jax.tree.map(jnp.add, total, f)
    n += ids.shape[0]
  if n == 0:
    raise ValueError("compute_fisher: no batches given")
  return jax.tree.map(lambda x: x / n, total)


def _gram(x_BTI, m_BT):
  x = x_BTI.astype(jnp.float32) * m_BT[..., None]
  return jnp.einsum("bti,btj->ij", x, x)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grams_batch(params, ids_BT, mask_BT, cfg):
  h_BTD, aux = llama.hidden_states(params, ids_BT, cfg, attention_mask_BT=mask_BT,
                                   collect=("attn_in", "o_in", "mlp_in", "down_in"))
  g = {k: jax.vmap(_gram, (0, None))(aux[k], mask_BT) for k in ("attn_in", "o_in", "mlp_in", "down_in")}
  out = {"layers/attn/q_proj/kernel": g["attn_in"], "layers/attn/k_proj/kernel": g["attn_in"],
         "layers/attn/v_proj/kernel": g["attn_in"], "layers/attn/o_proj/kernel": g["o_in"],
         "layers/mlp/gate_proj/kernel": g["mlp_in"], "layers/mlp/up_proj/kernel": g["mlp_in"],
         "layers/mlp/down_proj/kernel": g["down_in"]}
  if not cfg.tie_word_embeddings:
    out["lm_head/kernel"] = _gram(h_BTD, mask_BT)
  return out


def compute_regmean_grams(params, cfg: ModelConfig, batches) -> dict:
  """{kernel path: input Gram X^T X / n_tokens} for every linear layer (dense models)."""
  if cfg.is_moe:
    raise ValueError("compute_regmean_grams supports dense models only (cfg.num_experts == 0)")
  params = jax.tree.map(lambda x: x.astype(jnp.float32), tree_lib.fold_lora(params, cfg.lora_scale))
  total, n = None, 0.0
  for batch in batches:
    ids, mask, _ = _batch_arrays(batch)
    g = _grams_batch(params, ids, mask, cfg)
    total = g if total is None else {k: total[k] + g[k] for k in g}
    n += float(jnp.sum(mask))
  if not n:
    raise ValueError("compute_regmean_grams: no tokens in batches")
  return {k: v / n for k, v in total.items()}


# ----------------------------------------------------------------------------- merges

def _fisher_array(base_X, models_NX, key, *, n):
  params_NX, fish_NX = models_NX[:n], models_NX[n:]  # fish: c_i * (F_i + eps), pre-scaled
  return blocks.sum_models(fish_NX * params_NX) / blocks.sum_models(fish_NX)


def fisher(base, models, *, fishers, weight=1.0, normalize_fisher_weight=True,
           minimal_fisher_weight=1e-6, **kw):
  """theta = sum_i c_i F_i theta_i / sum_i c_i F_i (FusionBench `merging_with_fisher_weights`):
  F_i += minimal_fisher_weight; c_i = w_i, times 1/(||F_i|| + eps) normalised to sum 1 when
  normalize_fisher_weight (||F_i||: L2 norm over the whole model). `base` is unused."""
  pop_lambda("fisher", None, dict(kw))
  models = tree_lib.check_models("fisher", None, models, needs_base=False)
  if not isinstance(fishers, (list, tuple)) or len(fishers) != len(models):
    raise ValueError(f"fisher: need one Fisher tree per model ({len(models)}), "
                     f"got {len(fishers) if isinstance(fishers, (list, tuple)) else type(fishers).__name__}")
  n = len(models)
  coef = jnp.asarray([float(w) for w in tree_lib.rules_lib.per_model("weight", weight, n)], jnp.float32)
  if normalize_fisher_weight:
    norms = jnp.stack([jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                                    for x in jax.tree.leaves(f))) for f in fishers])
    inv = 1.0 / (norms + minimal_fisher_weight)
    coef = coef * inv / jnp.sum(inv)
  scaled = [jax.tree.map(lambda x, c=coef[i]: c * (x.astype(jnp.float32) + minimal_fisher_weight), f)
            for i, f in enumerate(fishers)]
  models = [tree_lib.fold_lora(m, kw.get("lora_scale", 1.0)) for m in models]
  return tree_lib.merge_tree(_fisher_array, None, list(models) + scaled, name="fisher",
                             hparams=dict(n=n), needs_base=False, **common_kwargs(kw))


@functools.partial(jax.jit, static_argnames=("alpha",))
def _regmean_solve(ws_NIO, gs_NII, alpha: float):
  eye = jnp.eye(gs_NII.shape[-1], dtype=bool)
  gt_NII = jnp.where(eye, gs_NII, alpha * gs_NII)
  lhs = blocks.sum_models(gt_NII)
  rhs = jnp.einsum("nij,njo->io", gt_NII, ws_NIO.astype(jnp.float32))
  return jnp.linalg.solve(lhs, rhs)


def regmean(base, models, *, grams, reduce_non_diagonal_ratio=0.1, **kw):
  """RegMean: for each kernel W [in, out] with input Grams G_i,
  W* = (sum_i G~_i)^-1 sum_i G~_i W_i, G~ = diagonal + alpha * off-diagonal
  (alpha = reduce_non_diagonal_ratio); every other leaf is averaged. `base` is unused.
  grams: one {path: Gram} dict per model (from compute_regmean_grams)."""
  pop_lambda("regmean", None, dict(kw))
  models = tree_lib.check_models("regmean", None, models, needs_base=False)
  if not isinstance(grams, (list, tuple)) or len(grams) != len(models):
    raise ValueError(f"regmean: need one Gram dict per model ({len(models)})")
  if not 0.0 <= reduce_non_diagonal_ratio <= 1.0:
    raise ValueError(f"regmean: reduce_non_diagonal_ratio must be in [0, 1], got {reduce_non_diagonal_ratio}")
  models = [tree_lib.fold_lora(m, kw.get("lora_scale", 1.0)) for m in models]
  table = tree_lib.rules_lib.validate_rules(kw.get("rules"))
  flat = [tree_lib.leaves_with_paths(m) for m in models]
  outs = []
  for j, (path, ref) in enumerate(flat[0]):
    ws = jnp.stack([jnp.asarray(f[j][1], jnp.float32) for f in flat])
    hp = tree_lib.rules_lib.resolve(path, table, {})
    if path in grams[0] and not (hp.get("exclude") or hp.get("keep_base")):
      gs = jnp.stack([jnp.asarray(g[path], jnp.float32) for g in grams])
      solve = functools.partial(_regmean_solve, alpha=float(reduce_non_diagonal_ratio))
      for _ in range(ws.ndim - 3):  # stacked layers: one solve per layer
        solve = jax.vmap(solve, in_axes=(1, 1))
      out = solve(ws, gs)
    else:
      out = jnp.mean(ws, axis=0)
    outs.append(out.astype(jax.dtypes.canonicalize_dtype(ref.dtype)))
  return jax.tree.unflatten(jax.tree.structure(models[0]), outs)
