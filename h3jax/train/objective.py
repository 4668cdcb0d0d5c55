"""The training objective: LM loss (+ for a fused MoE: gating, drift, balance, z-loss).

  loss = lm_weight · LM + λ · gating + Σ_i γ_i · drift_i + balance_weight · LB + z_weight · Z

LM is token cross-entropy on target tokens only (loss_mask_BT marks the
tokens to predict, i.e. response tokens), normalised by the number of target
tokens in the *global* batch, so gradient accumulation over microbatches gives
the same loss as one big batch, and a packed batch the same loss as its
examples unpacked. Batches with `positions_BT` / `segment_ids_BT` (packing)
pass them to the forward; the gating loss uses `task_B` (one task per row).
The MoE terms come from `h3jax.fusion.losses`; the router terms are averaged
over microbatches; drift depends only on params and is added once per step.

Faithful switches for the reference code (docs/h3fusion.md, defects #6, #7), all in the
`loss` config: gate_mode="double_softmax" (#6), gate_masked=False (#6),
drift_mode="lora_a_plus_b" with drift_layer_divisor=32 (#7).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

from h3jax.fusion import losses as fl
from h3jax.config import ModelConfig

GATE_MODES = ("nll", "double_softmax")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Hashable loss settings (a static jit argument)."""
  lm_weight: float = 1.0
  gate_weight: float = 0.0  # λ
  drift_weights: Tuple[float, ...] = ()  # γ_i, one per expert (empty: no drift term)
  drift_mode: str = "lora_delta"  # fusion.losses.DRIFT_MODES
  drift_layer_divisor: float = 0.0  # 0: the number of layers
  gate_mode: str = "nll"
  gate_masked: bool = True  # False: average router probs over all T positions (#6)
  balance_weight: float = 0.0
  z_weight: float = 0.0


def _scalar(name, value):
  if isinstance(value, (list, tuple)):
    if len(value) != 1:
      raise ValueError(f"{name} must be a single number, got {len(value)} values {list(value)}")
    value = value[0]
  return float(value)


def loss_config(c, cfg: ModelConfig) -> LossConfig:
  """Validate a `loss` ConfigDict (or dict) against the model; one clear error per problem."""
  c = dict(c)
  gammas = tuple(float(g) for g in c.get("drift_weights", ()) or ())
  lam = _scalar("loss.gate_weight (λ)", c.get("gate_weight", 0.0))
  if not cfg.is_moe:
    moe_terms = {"gate_weight": lam, "drift_weights": any(gammas),
                 "balance_weight": c.get("balance_weight", 0.0), "z_weight": c.get("z_weight", 0.0)}
    used = [k for k, v in moe_terms.items() if v]
    if used:
      raise ValueError(f"loss terms {used} need a fused MoE model (num_experts > 0); this model is dense")
  elif gammas and len(gammas) != cfg.num_experts:
    raise ValueError(f"loss.drift_weights (γ) has {len(gammas)} values but the MoE has "
                     f"{cfg.num_experts} experts {list(cfg.expert_names) or ''}; give one γ per expert")
  if c.get("gate_mode", "nll") not in GATE_MODES:
    raise ValueError(f"unknown loss.gate_mode {c['gate_mode']!r}; expected one of {GATE_MODES}")
  if c.get("drift_mode", "lora_delta") not in fl.DRIFT_MODES:
    raise ValueError(f"unknown loss.drift_mode {c['drift_mode']!r}; expected one of {fl.DRIFT_MODES}")
  return LossConfig(lm_weight=float(c.get("lm_weight", 1.0)), gate_weight=lam,
                    drift_weights=gammas if any(gammas) else (),
                    drift_mode=c.get("drift_mode", "lora_delta"),
                    drift_layer_divisor=float(c.get("drift_layer_divisor", 0.0)),
                    gate_mode=c.get("gate_mode", "nll"), gate_masked=bool(c.get("gate_masked", True)),
                    balance_weight=float(c.get("balance_weight", 0.0)), z_weight=float(c.get("z_weight", 0.0)))


def target_mask(batch):
  """[B, T-1] f32 weights of the next-token targets (loss_mask of the predicted token).

  In a packed row a token is never a target of the previous segment's last token.
  """
  w_BT = batch["loss_mask_BT"][:, 1:] * batch["attention_mask_BT"][:, 1:]
  if "segment_ids_BT" in batch:
    seg_BT = batch["segment_ids_BT"]
    w_BT = w_BT * (seg_BT[:, 1:] == seg_BT[:, :-1])
  return w_BT.astype(jnp.float32)


def token_xent_sum(logits_BTV, batch):
  """Sum of target-token cross-entropies (f32) and their count."""
  w_BT = target_mask(batch)
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  tgt_BT = batch["input_ids_BT"][:, 1:]
  nll_BT = -jnp.take_along_axis(logp_BTV, tgt_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(nll_BT * w_BT), jnp.sum(w_BT)


def micro_loss(params, batch, cfg: ModelConfig, lc: LossConfig, n_tok_global, n_micro: int, rng=None):
  """Loss share of one microbatch (summing over microbatches gives the step loss) and its metrics."""
  from h3jax.model import llama
  # packed rows (h3jax.data.pipeline): RoPE restarts per example, examples do not attend to each other
  logits_BTV, aux = llama.forward(params, batch["input_ids_BT"], cfg,
                                  attention_mask_BT=batch["attention_mask_BT"],
                                  positions_BT=batch.get("positions_BT"),
                                  segment_ids_BT=batch.get("segment_ids_BT"), rng=rng, return_aux=True)
  xent_sum, n_tok = token_xent_sum(logits_BTV, batch)
  lm = xent_sum / jnp.maximum(n_tok_global, 1.0)
  loss = lc.lm_weight * lm
  m = {"lm_loss": lm, "n_tokens": n_tok}
  if cfg.is_moe:
    resp_BT = batch["loss_mask_BT"] * batch["attention_mask_BT"]
    probs = aux["router_probs_BTE"]
    gate = fl.gating_loss(probs, batch["task_B"], resp_BT, unmasked=not lc.gate_masked,
                          double_softmax=lc.gate_mode == "double_softmax")
    m["gate_loss"] = gate / n_micro
    m["router_acc"] = fl.router_accuracy(probs, batch["task_B"], resp_BT, unmasked=not lc.gate_masked) / n_micro
    m["dropped_tokens"] = jnp.sum(aux["dropped_BT"]).astype(jnp.float32)
    if lc.gate_weight:
      loss = loss + lc.gate_weight * gate / n_micro
    if lc.balance_weight:
      lb = fl.load_balance_loss(probs, aux["topk_idx_BTK"], batch["attention_mask_BT"])
      m["balance_loss"] = lb / n_micro
      loss = loss + lc.balance_weight * lb / n_micro
    if lc.z_weight:
      z = fl.router_z_loss(aux["router_logits_BTE"], batch["attention_mask_BT"])
      m["z_loss"] = z / n_micro
      loss = loss + lc.z_weight * z / n_micro
  return loss, m


def drift_term(params, init_params, cfg: ModelConfig, lc: LossConfig):
  """Σ_i γ_i drift_i, or 0 when no γ is set."""
  if not lc.drift_weights:
    return jnp.zeros((), jnp.float32)
  return fl.drift_penalty(params, init_params, lc.drift_weights, lora_scale=cfg.lora_scale,
                          mode=lc.drift_mode, layer_divisor=lc.drift_layer_divisor or None)
