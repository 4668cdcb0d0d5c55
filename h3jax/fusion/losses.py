"""Stage-B loss terms of H^3Fusion: gating loss, expert drift, load balance, router z-loss.

All take the MoE aux of `llama.forward(..., return_aux=True)`, whose per-layer
entries are stacked on a leading L axis:
  aux["router_probs_BTE"]  [L, B, T, E]  f32 softmax over all experts (pre-top-k)
  aux["router_logits_BTE"] [L, B, T, E]
  aux["topk_idx_BTK"]      [L, B, T, k]
so e.g. `gating_loss(aux["router_probs_BTE"], task_B, response_mask_BT)`.

Every term is float32 and has a default (the intended method, docs/h3fusion.md
"Pipeline" step 3) plus switches that reproduce the reference code's defects
(numbered as in docs/h3fusion.md, "Reference-code defects"):
  gating_loss   default  -mean_b log P̄[b, y_b], P̄ = router probs averaged
                         over layers and the masked (response) tokens
                unmasked=True        average over all T positions (padding too; #6)
                double_softmax=True  CE(softmax(P̄), y), a second softmax (#6)
  drift_penalty mode="frobenius"       Σ_i γ_i (1/L) Σ_{ℓ,m} ‖W_eff - W_eff,0‖_F
                mode="lora_delta"      same on s·A·B only (kernels frozen), cheap r×r form
                mode="lora_a_plus_b"   Σ_i γ_i (1/32) Σ_{ℓ,m} (‖A‖ + ‖B‖) (#7; divisor switch)
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

_PROJS = ("gate_proj", "up_proj", "down_proj")
DRIFT_MODES = ("frobenius", "lora_delta", "lora_a_plus_b")


def safe_norm(x, axes=None):
  """‖x‖_F over `axes` with value and gradient exactly 0 at x = 0 (jnp.linalg.norm gives NaN grads)."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _check_labels(probs_LBTE, task_B):
  if probs_LBTE.ndim != 4:
    raise ValueError(f"router probabilities must be [L, B, T, E], got shape {tuple(probs_LBTE.shape)}")
  if task_B.shape != probs_LBTE.shape[1:2]:
    raise ValueError(f"task labels must be [B={probs_LBTE.shape[1]}], got shape {tuple(task_B.shape)}")


def mean_router_probs(router_probs_LBTE, mask_BT=None, *, unmasked: bool = False):
  """P̄ [B, E]: router probabilities averaged over layers and (masked) tokens."""
  L, B, T, E = router_probs_LBTE.shape
  probs_BTE = jnp.mean(router_probs_LBTE.astype(jnp.float32), axis=0)
  if unmasked or mask_BT is None:
    return jnp.mean(probs_BTE, axis=1)
  if tuple(mask_BT.shape) != (B, T):
    raise ValueError(f"mask must be [B={B}, T={T}], got shape {tuple(mask_BT.shape)}")
  w_BT = mask_BT.astype(jnp.float32)
  # A row without any masked token averages to 0 and is dropped by the caller's example mask.
  return jnp.einsum("bte,bt->be", probs_BTE, w_BT) / jnp.maximum(jnp.sum(w_BT, axis=1), 1.0)[:, None]


def gating_loss(router_probs_LBTE, task_B, response_mask_BT=None, *, unmasked: bool = False,
                double_softmax: bool = False):
  """Cross-entropy between each example's task label and its mean router distribution.

  task_B: int expert index per example; a negative label (or a row with no
  masked token in masked mode) leaves the example out of the mean.
  """
  _check_labels(router_probs_LBTE, task_B)
  E = router_probs_LBTE.shape[-1]
  pbar_BE = mean_router_probs(router_probs_LBTE, response_mask_BT, unmasked=unmasked)
  valid_B = task_B >= 0
  if response_mask_BT is not None and not unmasked:
    valid_B = valid_B & jnp.any(response_mask_BT.astype(bool), axis=1)
  y_BE = jax.nn.one_hot(jnp.where(valid_B, task_B, 0), E, dtype=jnp.float32)
  if double_softmax:  # torch CrossEntropyLoss(P̄, one_hot(y)): log_softmax of probabilities
    logp_BE = jax.nn.log_softmax(pbar_BE, axis=-1)
  else:  # P̄ is already a distribution; tiny floor keeps log finite when a prob underflows
    logp_BE = jnp.log(jnp.maximum(pbar_BE, jnp.finfo(jnp.float32).tiny))
  nll_B = -jnp.sum(y_BE * logp_BE, axis=-1)
  n = jnp.sum(valid_B)
  return jnp.sum(jnp.where(valid_B, nll_B, 0.0)) / jnp.maximum(n, 1)


def router_accuracy(router_probs_LBTE, task_B, response_mask_BT=None, *, unmasked: bool = False):
  """Fraction of labelled examples whose mean router distribution peaks at their task."""
  _check_labels(router_probs_LBTE, task_B)
  pbar_BE = mean_router_probs(router_probs_LBTE, response_mask_BT, unmasked=unmasked)
  valid_B = task_B >= 0
  hit_B = (jnp.argmax(pbar_BE, axis=-1) == task_B) & valid_B
  return jnp.sum(hit_B) / jnp.maximum(jnp.sum(valid_B), 1)


# ----------------------------------------------------------------------------- drift

def _experts(params, what: str):
  try:
    return params["layers"]["moe"]["experts"]
  except (KeyError, TypeError):
    raise ValueError(f"drift_penalty: {what} has no layers/moe/experts subtree (not a fused MoE params tree)")


def _lora_sq_norm(a_LEIR, b_LERO):
  """‖A @ B‖_F² per [L, E] from r×r Gram matrices: tr((AᵀA)(BBᵀ)), never forming [in, out]."""
  a32, b32 = a_LEIR.astype(jnp.float32), b_LERO.astype(jnp.float32)
  ata_LERR = jnp.einsum("...ir,...is->...rs", a32, a32)
  bbt_LERR = jnp.einsum("...ro,...so->...rs", b32, b32)
  return jnp.sum(ata_LERR * bbt_LERR, axis=(-2, -1))


def drift_penalty(params, init_params, gammas: Sequence[float], *, lora_scale: float = 1.0,
                  mode: str = "frobenius", layer_divisor: Optional[float] = None,
                  with_kernel_norms: bool = False):
  """Σ_i γ_i · drift(expert i) over the gate/up/down matrices of every layer.

  params / init_params: full params trees holding layers/moe/experts (LoRA
  leaves optional; init_params may lack them, i.e. a zero initial delta).
  Effective weight W_eff = kernel + lora_scale · A @ B.
    frobenius      (1/L) Σ_{ℓ,m} ‖W_eff(params) - W_eff(init)‖_F
    lora_delta     (1/L) Σ_{ℓ,m} ‖lora_scale · A @ B‖_F  (assumes frozen kernels, zero-init B)
    lora_a_plus_b  (1/divisor) Σ_{ℓ,m} (‖A‖_F + ‖B‖_F); the reference uses divisor 32
                   and with_kernel_norms=True adds its constant Σ ‖kernel‖_F term.
  layer_divisor defaults to L. Norms are safe (zero gradient at zero).
  """
  if mode not in DRIFT_MODES:
    raise ValueError(f"unknown drift mode {mode!r}; expected one of {DRIFT_MODES}")
  ex = _experts(params, "params")
  L, E = ex["gate_proj"]["kernel"].shape[:2]
  g = jnp.asarray(gammas, jnp.float32)
  if g.ndim != 1 or g.shape[0] != E:
    raise ValueError(f"drift gammas must have one entry per expert: got {g.shape[0] if g.ndim == 1 else g.shape} "
                     f"for an MoE with {E} experts")
  div = float(L if layer_divisor is None else layer_divisor)
  ex0 = _experts(init_params, "init_params") if mode == "frobenius" else None
  per_E = jnp.zeros((E,), jnp.float32)
  for name in _PROJS:
    leaf = ex[name]
    has_lora = "lora_a" in leaf
    if mode == "frobenius":
      leaf0 = ex0[name]
      delta = leaf["kernel"].astype(jnp.float32) - leaf0["kernel"].astype(jnp.float32)
      if has_lora:
        delta = delta + lora_scale * jnp.einsum("leir,lero->leio", leaf["lora_a"].astype(jnp.float32),
                                                leaf["lora_b"].astype(jnp.float32))
      if "lora_a" in leaf0:
        delta = delta - lora_scale * jnp.einsum("leir,lero->leio", leaf0["lora_a"].astype(jnp.float32),
                                                leaf0["lora_b"].astype(jnp.float32))
      norm_LE = safe_norm(delta, axes=(-2, -1))
    elif not has_lora:
      raise ValueError(f"drift mode {mode!r} needs LoRA leaves on layers/moe/experts/{name}")
    elif mode == "lora_delta":
      sq_LE = _lora_sq_norm(leaf["lora_a"], leaf["lora_b"])
      pos = sq_LE > 0
      norm_LE = abs(lora_scale) * jnp.where(pos, jnp.sqrt(jnp.where(pos, sq_LE, 1.0)), 0.0)
    else:
      norm_LE = safe_norm(leaf["lora_a"], axes=(-2, -1)) + safe_norm(leaf["lora_b"], axes=(-2, -1))
      if with_kernel_norms:
        norm_LE = norm_LE + jax.lax.stop_gradient(safe_norm(leaf["kernel"], axes=(-2, -1)))
    per_E = per_E + jnp.sum(norm_LE, axis=0)
  return jnp.sum(g * per_E) / div


# ----------------------------------------------------------------------------- router regularisers

def _token_weights(shape_LBT, mask_BT):
  if mask_BT is None:
    return jnp.ones(shape_LBT, jnp.float32)
  if tuple(mask_BT.shape) != tuple(shape_LBT[1:]):
    raise ValueError(f"mask must be [B, T]={tuple(shape_LBT[1:])}, got shape {tuple(mask_BT.shape)}")
  return jnp.broadcast_to(mask_BT.astype(jnp.float32)[None], shape_LBT)


def load_balance_loss(router_probs_LBTE, topk_idx_LBTK, mask_BT=None):
  """HF Mixtral `load_balancing_loss_func` over all layers' tokens (unscaled; coef is the caller's).

  E · Σ_{j,e} f[j, e] · P[e], f = fraction of tokens whose j-th choice is e,
  P = mean router probability; padding (mask_BT False) is left out. Equals k
  when perfectly balanced.
  """
  E = router_probs_LBTE.shape[-1]
  w_LBT = _token_weights(router_probs_LBTE.shape[:3], mask_BT)
  n = jnp.maximum(jnp.sum(w_LBT), 1.0)
  onehot_LBTKE = jax.nn.one_hot(topk_idx_LBTK, E, dtype=jnp.float32)
  f_KE = jnp.einsum("lbtke,lbt->ke", onehot_LBTKE, w_LBT) / n
  p_E = jnp.einsum("lbte,lbt->e", router_probs_LBTE.astype(jnp.float32), w_LBT) / n
  return E * jnp.sum(f_KE * p_E[None, :])


def router_z_loss(router_logits_LBTE, mask_BT=None):
  """ST-MoE z-loss: mean over layers and real tokens of logsumexp(logits)²."""
  w_LBT = _token_weights(router_logits_LBTE.shape[:3], mask_BT)
  z_LBT = jax.nn.logsumexp(router_logits_LBTE.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(z_LBT) * w_LBT) / jnp.maximum(jnp.sum(w_LBT), 1.0)
