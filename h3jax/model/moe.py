"""Mixture-of-experts SwiGLU FFN: routing, the dense oracle, and backend selection.

`moe_ffn(p, x_BTD, cfg)` is one MoE layer (Mixtral semantics, = HF
`MixtralSparseMoeBlock`): the router runs in float32, softmax over all E
experts, `jax.lax.top_k`, and the k weights are renormalised to sum to 1.
Each expert is `down(silu(gate x) * up x)` in `cfg.compute_dtype`, with
optional per-expert LoRA leaves (`lora_a` [E, in, r], `lora_b` [E, r, out],
scale `cfg.lora_scale`, dropout `cfg.lora_dropout` on the LoRA input path).

Backends (`cfg.moe_dispatch`), all equal to `dense` when nothing is dropped:
  dense            every expert on every token, combined with a [N, E] weight
                   matrix that is zero outside the top-k (the oracle; E/k x FLOPs).
  capacity         index scatter into an [E, C, D] buffer + batched einsum
                   (`moe_dispatch.capacity_ffn`); the CPU/GPU default.
  ragged           sort by expert + `jax.lax.ragged_dot` (dropless; TPU).
  expert_parallel  capacity buffers exchanged with `jax.lax.all_to_all` inside
                   `jax.shard_map` over an `expert` mesh axis.
  sparse           sort by expert, one `lax.switch` per tile of rows, so only the
                   chosen experts' weights are read (`moe_dispatch.sparse_ffn`;
                   dropless; what `load_pretrained` picks for inference).

`p["experts"]` is a tree of stacked [E, in, out] leaves, or (for cached
decoding, see `llama.unstack_layers`) a tuple of E per-expert trees; backends
other than `sparse` restack such a tuple.

Conventions shared by every backend:
  * Padding tokens (mask_BT False) consume no capacity and output exactly 0.
  * LoRA dropout masks are drawn per (token, top-k choice) before dispatch, so
    every backend applies the same mask to the same token-expert pair and the
    backends agree even with dropout on.
  * Router statistics are computed on the full token set before dispatch, so
    the aux outputs do not depend on the backend except `dropped_BT`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from h3jax.config import ModelConfig
from h3jax.model import moe_dispatch as dispatch
from h3jax.model import layers, panels

_PROJ_IN_OUT = {"gate_proj": ("D", "F"), "up_proj": ("D", "F"), "down_proj": ("F", "D")}


def check_moe_params(p: dict, x_BTD, cfg: ModelConfig, mask_BT=None):
  """Raise one clear ValueError for any shape or config mismatch."""
  if not cfg.is_moe:
    raise ValueError("moe_ffn needs cfg.num_experts > 0 (this config has a dense FFN)")
  E, k, D, F = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
  if not 1 <= k <= E:
    raise ValueError(f"top_k (num_experts_per_tok={k}) must be in [1, num_experts={E}]")
  if cfg.moe_dispatch not in dispatch.BACKENDS:
    raise ValueError(f"unknown moe_dispatch {cfg.moe_dispatch!r}; expected one of {tuple(dispatch.BACKENDS)}")
  if x_BTD.ndim != 3 or x_BTD.shape[-1] != D:
    raise ValueError(f"moe_ffn input must be [B, T, D={D}], got shape {tuple(x_BTD.shape)}")
  if mask_BT is not None and tuple(mask_BT.shape) != tuple(x_BTD.shape[:2]):
    raise ValueError(f"mask_BT shape {tuple(mask_BT.shape)} does not match tokens {tuple(x_BTD.shape[:2])}")
  r_shape = tuple(p["router"]["kernel"].shape)
  if r_shape != (D, E):
    raise ValueError(f"router kernel must be [D={D}, E={E}] (cfg.num_experts={E}), got {r_shape}")
  dims = {"D": D, "F": F}
  experts = p["experts"]
  if isinstance(experts, (tuple, list)):
    if len(experts) != E:
      raise ValueError(f"experts is a tuple of {len(experts)} per-expert trees, expected num_experts={E}")
    experts = jax.eval_shape(dispatch.stack_experts, experts)
  for name, (i, o) in _PROJ_IN_OUT.items():
    leaf = experts[name]
    want = (E, dims[i], dims[o])
    if panels.kernel_shape(leaf) != want:
      raise ValueError(f"experts/{name}/kernel must be [E, {i}, {o}] = {want}, got {panels.kernel_shape(leaf)}")
    if ("lora_a" in leaf) != ("lora_b" in leaf):
      raise ValueError(f"experts/{name} has only one of lora_a / lora_b")
    if "lora_a" in leaf:
      a, b = tuple(leaf["lora_a"].shape), tuple(leaf["lora_b"].shape)
      if len(a) != 3 or len(b) != 3 or a[:2] != (E, dims[i]) or b[0] != E or b[2] != dims[o] or a[2] != b[1]:
        raise ValueError(f"experts/{name} LoRA must be lora_a [E, {i}, r] and lora_b [E, r, {o}] with "
                         f"E={E}, {i}={dims[i]}, {o}={dims[o]}; got {a} and {b}")


def route(router_kernel_DE, x_ND, k: int):
  """Mixtral routing in float32: (logits_NE, probs_NE, topi_NK int32, topw_NK renormalised)."""
  logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), router_kernel_DE.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  topv_NK, topi_NK = jax.lax.top_k(probs_NE, k)
  topw_NK = topv_NK / jnp.sum(topv_NK, axis=-1, keepdims=True)
  return logits_NE, probs_NE, topi_NK.astype(jnp.int32), topw_NK


def dropout_keeps(p_experts: dict, rng, N: int, k: int, cfg: ModelConfig):
  """Per-(token, choice) keep masks for the LoRA inputs, or None when dropout is off.

  Returns {proj: keep_NKI bool} for the projections that carry LoRA leaves.
  """
  if rng is None or cfg.lora_dropout <= 0:
    return None
  one = p_experts[0] if isinstance(p_experts, (tuple, list)) else jax.tree.map(lambda a: a[0], p_experts)
  lora = [n for n in _PROJ_IN_OUT if "lora_a" in one[n]]
  if not lora:
    return None
  rngs = dict(zip(_PROJ_IN_OUT, jax.random.split(rng, 3)))
  return {n: layers.dropout_keep(rngs[n], cfg.lora_dropout, (N, k, panels.kernel_shape(one[n])[0]))
          for n in lora}


def dense_ffn(p_experts, x_ND, topi_NK, combine_NK, keeps, cfg: ModelConfig):
  """Oracle: all E experts on all N tokens, weighted by a [N, E] matrix zero outside top-k."""
  E = p_experts["gate_proj"]["kernel"].shape[0]
  N, k = topi_NK.shape
  sel_NKE = jax.nn.one_hot(topi_NK, E, dtype=jnp.float32)
  w_NE = jnp.einsum("nk,nke->ne", combine_NK, sel_NKE)
  keeps_E = None
  if keeps is not None:  # scatter each choice's mask onto its expert; unselected pairs have weight 0
    keeps_E = {}
    for name, keep_NKI in keeps.items():
      keep_ENI = jnp.ones((E, N, keep_NKI.shape[-1]), bool)
      for j in range(k):
        hit_EN1 = (topi_NK[:, j][None, :] == jnp.arange(E)[:, None])[..., None]
        keep_ENI = jnp.where(hit_EN1, keep_NKI[None, :, j], keep_ENI)
      keeps_E[name] = keep_ENI
  out_END = dispatch.expert_swiglu(p_experts, x_ND, keeps_E, cfg)  # x shared by all experts
  return jnp.einsum("end,ne->nd", out_END, w_NE.astype(out_END.dtype),
                    preferred_element_type=jnp.float32)


def moe_ffn(p: dict, x_BTD, cfg: ModelConfig, *, mask_BT=None, rng=None, mesh=None):
  """One MoE FFN layer. Returns (y_BTD in x's dtype, aux).

  aux (all per layer; under `lax.scan` they gain a leading L axis):
    router_logits_BTE  f32 router logits
    router_probs_BTE   f32 softmax over all E (pre-top-k; the gating loss needs these)
    topk_idx_BTK       int32 chosen experts, best first
    topk_weight_BTK    f32 renormalised combine weights (before any capacity drop)
    expert_load_E      int32 real tokens routed to each expert (all k choices, before drops)
    dropped_BT         int32 number of this token's choices dropped by capacity (0..k)
  """
  check_moe_params(p, x_BTD, cfg, mask_BT)
  B, T, D = x_BTD.shape
  E, k, N = cfg.num_experts, cfg.num_experts_per_tok, B * T
  x_ND = x_BTD.reshape(N, D)
  valid_N = jnp.ones((N,), bool) if mask_BT is None else mask_BT.reshape(N).astype(bool)
  logits_NE, probs_NE, topi_NK, topw_NK = route(p["router"]["kernel"], x_ND, k)
  combine_NK = jnp.where(valid_N[:, None], topw_NK, 0.0)  # padding tokens output 0
  keeps = dropout_keeps(p["experts"], rng, N, k, cfg)
  xc_ND = x_ND.astype(cfg.compute_dtype)
  dropped_N = jnp.zeros((N,), jnp.int32)
  experts = p["experts"] if cfg.moe_dispatch == "sparse" else dispatch.stack_experts(p["experts"])
  if cfg.moe_dispatch == "sparse":
    y_ND = dispatch.sparse_ffn(experts, xc_ND, topi_NK, combine_NK, valid_N, keeps, cfg)
  elif cfg.moe_dispatch == "dense":
    y_ND = dense_ffn(experts, xc_ND, topi_NK, combine_NK, keeps, cfg)
  elif cfg.moe_dispatch == "capacity":
    C = dispatch.capacity(N, E, k, cfg.capacity_factor)
    y_ND, dropped_N = dispatch.capacity_ffn(experts, xc_ND, topi_NK, combine_NK, valid_N, keeps, C, cfg)
  elif cfg.moe_dispatch == "ragged":
    y_ND = dispatch.ragged_ffn(experts, xc_ND, topi_NK, combine_NK, valid_N, keeps, cfg)
  else:
    y_ND, dropped_N = dispatch.expert_parallel_ffn(experts, xc_ND, topi_NK, combine_NK, valid_N, keeps,
                                                   cfg, mesh)
  load_E = jnp.sum(jax.nn.one_hot(topi_NK, E, dtype=jnp.int32) * valid_N[:, None, None], axis=(0, 1))
  aux = {
      "router_logits_BTE": logits_NE.reshape(B, T, E),
      "router_probs_BTE": probs_NE.reshape(B, T, E),
      "topk_idx_BTK": topi_NK.reshape(B, T, k),
      "topk_weight_BTK": topw_NK.reshape(B, T, k),
      "expert_load_E": load_E,
      "dropped_BT": dropped_N.reshape(B, T),
  }
  return y_ND.reshape(B, T, D).astype(x_BTD.dtype), aux
