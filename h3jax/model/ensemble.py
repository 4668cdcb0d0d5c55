"""Output-level ensemble of M models of one architecture: the LLM-ensemble baseline of H^3Fusion.

The members' params are stacked on a new leading axis (`stack_members`) and the model functions run
vmapped over it; the ensemble's "logits" are the log of the mean of the members' next-token
probabilities (`cfg.ensemble_mode="prob"`), or the mean of their log-probabilities ("logprob", a
normalised geometric mean). Both are normalised log-probabilities, so greedy / sampled decoding and
MC log-probs use them unchanged. A config with `ensemble_size=M` routes `llama.forward`,
`llama.forward_cached` and `llama.init_cache` here; the KV cache gains the leading member axis
([M, L, B, S, K, Dh]), so the batch axis stays at -4.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from h3jax.config import ModelConfig

MODES = ("prob", "logprob")


def stack_members(params_list: Sequence[dict]) -> dict:
  """One params tree with every leaf stacked on a new leading member axis [M, ...]."""
  if len(params_list) < 2:
    raise ValueError(f"an ensemble needs at least 2 members, got {len(params_list)}")
  structs = [jax.tree.structure(p) for p in params_list]
  if any(s != structs[0] for s in structs[1:]):
    raise ValueError("ensemble members must have the same params structure (same architecture)")
  shapes = [[x.shape for x in jax.tree.leaves(p)] for p in params_list]
  if any(s != shapes[0] for s in shapes[1:]):
    raise ValueError("ensemble members must have the same parameter shapes")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def ensemble_config(cfg: ModelConfig, size: int, mode: str = "prob") -> ModelConfig:
  if mode not in MODES:
    raise ValueError(f"unknown ensemble mode {mode!r}; expected one of {MODES}")
  return cfg.replace(ensemble_size=size, ensemble_mode=mode)


def combine(logits_MBTV, mode: str):
  """Members' logits -> the ensemble's normalised log-probabilities [B, T, V] (float32)."""
  logp_MBTV = jax.nn.log_softmax(logits_MBTV.astype(jnp.float32), axis=-1)
  if mode == "prob":
    return jax.nn.logsumexp(logp_MBTV, axis=0) - math.log(logp_MBTV.shape[0])
  return jax.nn.log_softmax(jnp.mean(logp_MBTV, axis=0), axis=-1)


def _member(cfg: ModelConfig) -> ModelConfig:
  return cfg.replace(ensemble_size=0)


def forward(params, input_ids_BT, cfg: ModelConfig, **kw):
  from h3jax.model import llama
  if kw.get("return_aux"):
    raise ValueError("an output ensemble has no single set of hidden states (return_aux)")
  logits_MBTV = jax.vmap(lambda p: llama.forward(p, input_ids_BT, _member(cfg), **kw))(params)
  return combine(logits_MBTV, cfg.ensemble_mode)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  from h3jax.model import llama
  one = llama.init_cache(_member(cfg), batch, max_len, dtype)
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.ensemble_size,) + x.shape), one)


def forward_cached(params, input_ids_BT, positions_BT, cache, cache_index, key_mask_BS, cfg: ModelConfig,
                   kv_len=None, last_only=False):
  from h3jax.model import llama

  def one(p, c):
    return llama.forward_cached(p, input_ids_BT, positions_BT, c, cache_index, key_mask_BS, _member(cfg),
                                kv_len=kv_len, last_only=last_only)

  logits_MBTV, new_cache = jax.vmap(one)(params, cache)
  return combine(logits_MBTV, cfg.ensemble_mode), new_cache


def unstack_layers(params) -> dict:
  """llama.unstack_layers for stacked members: per-layer trees keep the leading member axis."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  L = jax.tree.leaves(layers)[0].shape[1]
  return dict(params, layers=tuple(jax.tree.map(lambda a: a[:, i], layers) for i in range(L)))
