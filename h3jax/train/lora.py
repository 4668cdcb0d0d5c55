"""Add fresh LoRA factors to the linear leaves a path-rule table selects.

A matched linear dict `{kernel [..., in, out]}` gains
  lora_a [..., in, r]  Kaiming-uniform, bound 1/sqrt(in) (PEFT's
                       `kaiming_uniform_(a=sqrt(5))` on its [r, in] weight)
  lora_b [..., r, out] zeros, so the model is unchanged at step 0.
Leading axes (layers L, experts E) are kept, so per-expert MoE kernels
[L, E, in, out] get one independent adapter per expert. The model applies
them with `cfg.lora_scale = alpha / r` (see `lora_model_config`). Folding them
into the kernels (`merge_lora`, `lora_delta`, `strip_lora`) lives beside the
model in `h3jax.model.lora` and is re-exported here.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from h3jax.config import ModelConfig
from h3jax.model.lora import lora_delta, merge_lora, strip_lora  # noqa: F401  (re-exported)
from h3jax import rules as rules_lib
from h3jax.rules import path_str
from h3jax.model.params import flatten_dict, unflatten_dict

# The paper's LoRA targets (docs/h3fusion.md, "Pipeline" steps 1 and 3) as `h3jax.rules` patterns
# over the linear dict's path (without the trailing "/kernel").
FFN_TARGETS = ("re:^layers/(mlp|moe/experts)/(gate|up|down)_proj$",)
ATTN_TARGETS = ("layers/attn/[qkvo]_proj",)


def lora_model_config(cfg: ModelConfig, rank: int, alpha: float, dropout: float) -> ModelConfig:
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  return cfg.replace(lora_scale=float(alpha) / rank, lora_dropout=float(dropout))


def add_lora(params: dict, targets: Sequence[str], rank: int, key: jax.Array,
             dtype=jnp.float32) -> dict:
  """Copy of `params` with lora_a / lora_b next to every matched `kernel`.

  Targets are `h3jax.rules` patterns. Raises if a target matches no linear layer (a typo would otherwise
  silently train nothing) or if a matched layer already has LoRA.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  flat = flatten_dict(params)
  linears = sorted(k[:-1] for k in flat if k[-1] == "kernel")
  hits = {pattern: [] for pattern, _ in rules_lib.check_rules([(t, None) for t in targets], "LoRA targets")}
  for lin in linears:
    for pattern in targets:
      if rules_lib.matches(pattern, path_str(lin)):
        hits[pattern].append(lin)
        break
  unused = [p for p, h in hits.items() if not h]
  if unused:
    raise ValueError(f"LoRA target patterns {unused} match no linear layer; linear layers are "
                     f"{[path_str(l) for l in linears]}")
  chosen = [lin for h in hits.values() for lin in h]
  keys = jax.random.split(key, max(len(chosen), 1))
  out = dict(flat)
  for lin, k in zip(chosen, keys):
    if lin + ("lora_a",) in flat:
      raise ValueError(f"{path_str(lin)} already has LoRA factors")
    kernel = flat[lin + ("kernel",)]
    *lead, d_in, d_out = kernel.shape
    bound = 1.0 / math.sqrt(d_in)
    out[lin + ("lora_a",)] = jax.random.uniform(k, (*lead, d_in, rank), jnp.float32, -bound, bound).astype(dtype)
    out[lin + ("lora_b",)] = jnp.zeros((*lead, rank, d_out), dtype)
  return unflatten_dict(out)
