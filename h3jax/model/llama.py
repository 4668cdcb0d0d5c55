"""Llama-family decoder (Llama, Mistral, Qwen2; dense or MoE FFN) over a params pytree.

Layers are stacked on a leading axis and run with `jax.lax.scan`. The same
block serves training (full sequences, optional packing) and cached decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from h3jax.config import ModelConfig
from h3jax.model import layers, panels


def positions_from_mask(attention_mask_BT):
  """Positions for left- or right-padded rows: count of real tokens before t."""
  mask_BT = attention_mask_BT.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask_BT, axis=-1) - 1, 0)


def _remat(fn, cfg: ModelConfig):
  if cfg.remat == "full":
    return jax.checkpoint(fn)
  if cfg.remat == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return fn


# Intermediates a forward pass can return per layer (`collect`): the residual stream entering the layer,
# the normed attention input, o_proj's input, the normed FFN input and (dense) down_proj's input.
COLLECTABLE = ("layer_in", "attn_in", "o_in", "mlp_in", "down_in")


def _block(p, x_BTD, cos_BTH, sin_BTH, mask_BTS, token_mask_BT, cfg: ModelConfig,
           kv=None, cache_index=None, layer=0, kv_len=None, rng=None, collect=()):
  rngs = jax.random.split(rng, 2) if rng is not None else (None, None)
  taps = {"layer_in": x_BTD} if collect else None
  h_BTD = layers.rms_norm(x_BTD, p["attn_norm"]["scale"], cfg.rms_norm_eps)
  attn_BTD, new_kv = layers.attention(p["attn"], h_BTD, cos_BTH, sin_BTH, mask_BTS, cfg,
                                      kv_cache=kv, cache_index=cache_index, layer=layer,
                                      kv_len=kv_len, rng=rngs[0], taps=taps)
  if collect:
    taps["attn_in"] = h_BTD
  x_BTD = x_BTD + attn_BTD.astype(x_BTD.dtype)
  h_BTD = layers.rms_norm(x_BTD, p["mlp_norm"]["scale"], cfg.rms_norm_eps)
  if collect:
    taps["mlp_in"] = h_BTD
  aux = {}
  if cfg.is_moe:
    from h3jax.model import moe  # imported lazily: dense models never need it
    ffn_BTD, aux = moe.moe_ffn(p["moe"], h_BTD, cfg, mask_BT=token_mask_BT, rng=rngs[1])
  else:
    ffn_BTD = layers.swiglu_mlp(p["mlp"], h_BTD, cfg, rngs[1], taps=taps)
  if collect:
    aux = dict(aux, **{k: taps[k] for k in collect})
  return x_BTD + ffn_BTD.astype(x_BTD.dtype), new_kv, aux


def _over_layers(step, carry, layers_p, per_layer, cfg: ModelConfig):
  """carry, aux stacked on L from step(carry, (layer params, per_layer[i])) over the layers:
  unrolled over an unstacked tuple (see unstack_layers) or slices, else a lax.scan."""
  unstacked = isinstance(layers_p, (list, tuple))
  if cfg.scan_layers and not unstacked:
    return jax.lax.scan(step, carry, (layers_p, per_layer))
  outs = []
  for i in range(cfg.num_layers):
    p = layers_p[i] if unstacked else jax.tree.map(lambda a: a[i], layers_p)
    carry, out = step(carry, (p, None if per_layer is None else per_layer[i]))
    outs.append(out)
  return carry, (jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else {})


def _run_layers(layers_p, x_BTD, cos_BTH, sin_BTH, mask_BTS, token_mask_BT, cfg: ModelConfig,
                cache=None, cache_index=None, kv_len=None, rng=None, collect=()):
  """Run the layers. Returns (x_BTD, new_cache or None, aux stacked on L)."""
  if cache is not None:
    return _run_layers_cached(layers_p, x_BTD, cos_BTH, sin_BTH, mask_BTS, token_mask_BT, cfg,
                              cache, cache_index, kv_len)
  rngs_L = jax.random.split(rng, cfg.num_layers) if rng is not None else None

  def step(x_BTD, xs):
    p, r = xs
    x_BTD, _, aux = _block(p, x_BTD, cos_BTH, sin_BTH, mask_BTS, token_mask_BT, cfg, rng=r, collect=collect)
    return x_BTD, aux

  x_BTD, aux = _over_layers(_remat(step, cfg), x_BTD, layers_p, rngs_L, cfg)
  return x_BTD, None, aux


def _run_layers_cached(layers_p, x_BTD, cos_BTH, sin_BTH, mask_BTS, token_mask_BT, cfg: ModelConfig,
                       cache, cache_index, kv_len):
  # The stacked cache is a loop carry, so XLA updates it in place: a decode step writes its
  # L x T new slots instead of copying the whole [L, B, S, K, Dh] cache (as scan ys would).
  def step(carry, xs):
    x_BTD, kv = carry
    p, layer = xs
    x_BTD, kv, aux = _block(p, x_BTD, cos_BTH, sin_BTH, mask_BTS, token_mask_BT, cfg, kv=kv,
                            cache_index=cache_index, layer=layer, kv_len=kv_len)
    return (x_BTD, kv), aux

  layer_L = jnp.arange(cfg.num_layers, dtype=jnp.int32)
  (x_BTD, (k_LBSKH, v_LBSKH)), aux = _over_layers(step, (x_BTD, (cache["k"], cache["v"])), layers_p,
                                                  layer_L, cfg)
  return x_BTD, {"k": k_LBSKH, "v": v_LBSKH}, aux


@functools.partial(jax.jit, static_argnames=("split_experts",))
def _unstack(layers_p, split_experts: bool):
  if not isinstance(layers_p, (list, tuple)):
    L = jax.tree.leaves(layers_p)[0].shape[0]
    layers_p = tuple(jax.tree.map(lambda a: a[i], layers_p) for i in range(L))
  if split_experts:
    from h3jax.model import moe_dispatch
    layers_p = tuple(dict(p, moe=dict(p["moe"], experts=moe_dispatch.split_experts(p["moe"]["experts"])))
                     for p in layers_p)
  return tuple(layers_p)


def unstack_layers(params, cfg: ModelConfig = None) -> dict:
  """params with "layers" as a tuple of L per-layer trees (a copy of the layer weights).

  For cached decoding: a weight sliced out of the stacked [L, ...] array inside a
  loop is first copied to its own buffer before XLA:CPU's matrix-vector kernel
  reads it, which triples the bytes moved per token; one buffer per layer halves
  the decode step time of SmolLM2-135M on CPU. With an MoE cfg whose dispatch is
  `sparse`, each layer's experts are split the same way into a tuple of E trees,
  so a decode step reads just the chosen experts. On one CPU device with float32 compute the kernels and
  the head are also packed in column panels for the CPU decode kernel (model/panels.py; H3JAX_CPU_KERNELS=0
  turns it off). `forward_cached` accepts any form.
  """
  if cfg is not None and cfg.ensemble_size:
    from h3jax.model import ensemble
    return ensemble.unstack_layers(params)
  split = cfg is not None and cfg.is_moe and cfg.moe_dispatch == "sparse"
  layers_p = params["layers"]
  unstacked = isinstance(layers_p, (list, tuple))
  own = not unstacked or (split and not isinstance(layers_p[0]["moe"]["experts"], (list, tuple)))
  if own:
    params = dict(params, layers=_unstack(layers_p, split))
  del layers_p
  if cfg is not None and panels.should_pack(params, cfg):
    params = panels.pack(params, cfg, consume=own)
  return params


def embed(params, input_ids_BT, cfg: ModelConfig):
  table_VD = params["embed"]["embedding"]
  ids_sharding = jax.typeof(input_ids_BT).sharding
  if ids_sharding.mesh.axis_names:  # explicit mesh: the gather's output follows the batch sharding
    out = jax.sharding.NamedSharding(ids_sharding.mesh, jax.sharding.PartitionSpec(*ids_sharding.spec, None))
    return table_VD.at[input_ids_BT].get(out_sharding=out).astype(cfg.compute_dtype)  # [B, T, D]
  return jnp.take(table_VD, input_ids_BT, axis=0).astype(cfg.compute_dtype)  # [B, T, D]


def logits_from_hidden(params, hidden_BTD, cfg: ModelConfig):
  """Vocabulary projection (tied or untied) with float32 logits."""
  dt = cfg.compute_dtype
  h_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]).astype(dt)  # one matrix: see layers.linear
  if "kernel_panels" in params.get("lm_head", {}):  # decode params packed for the CPU kernel, tied or not
    logits_NV = panels.matmul(params["lm_head"], h_ND, dt).astype(jnp.float32)
  elif cfg.tie_word_embeddings:
    logits_NV = jnp.einsum("nd,vd->nv", h_ND, params["embed"]["embedding"].astype(dt),
                           preferred_element_type=jnp.float32)
  else:
    logits_NV = jnp.einsum("nd,dv->nv", h_ND, params["lm_head"]["kernel"].astype(dt),
                           preferred_element_type=jnp.float32)
  return logits_NV.reshape(*hidden_BTD.shape[:-1], logits_NV.shape[-1])


def causal_mask(token_mask_BT, segment_ids_BT=None):
  """[B, T, S] bool: query t may attend key s <= t that is a real token (of t's packed segment)."""
  T = token_mask_BT.shape[1]
  mask_BTS = jnp.tril(jnp.ones((T, T), bool))[None] & token_mask_BT.astype(bool)[:, None, :]
  if segment_ids_BT is not None:
    mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
  return mask_BTS


def hidden_states(params, input_ids_BT, cfg: ModelConfig, *, attention_mask_BT=None,
                  positions_BT=None, segment_ids_BT=None, rng=None, collect=()):
  """Final-norm hidden states [B, T, D] and per-layer aux (MoE router stats, [L, ...]).

  collect: names from COLLECTABLE; each is returned in aux stacked on L (e.g. aux["mlp_in"] [L, B, T, D],
  what fusion's hidden router and RegMean's Grams observe), from the one decoder block.
  """
  unknown = set(collect) - set(COLLECTABLE) | ({"down_in"} & set(collect) if cfg.is_moe else set())
  if unknown:
    raise ValueError(f"cannot collect {sorted(unknown)}; collectable: {COLLECTABLE} (down_in: dense only)")
  B, T = input_ids_BT.shape
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  token_mask_BT = (jnp.ones((B, T), bool) if attention_mask_BT is None
                   else attention_mask_BT.astype(bool))
  mask_BTS = causal_mask(token_mask_BT, segment_ids_BT)
  cos_BTH, sin_BTH = layers.rope_cos_sin(positions_BT, cfg)
  x_BTD = embed(params, input_ids_BT, cfg)
  x_BTD, _, aux = _run_layers(params["layers"], x_BTD, cos_BTH, sin_BTH, mask_BTS, token_mask_BT,
                              cfg, rng=rng, collect=tuple(collect))
  return layers.rms_norm(x_BTD, params["final_norm"]["scale"], cfg.rms_norm_eps), aux


def forward(params, input_ids_BT, cfg: ModelConfig, *, attention_mask_BT=None, positions_BT=None,
            segment_ids_BT=None, rng=None, return_aux=False, collect=()):
  """Logits [B, T, V] (float32).

  attention_mask_BT marks real tokens (padding may be left or right). Positions
  default to 0..T-1 as in transformers; pass `positions_from_mask(mask)` for
  left-padded batches. segment_ids_BT restricts attention to one packed
  sequence. `rng` enables LoRA dropout. With return_aux, also returns
  {"hidden_BTD", and for MoE "router_logits"/"router_probs" [L, B, T, E], ...}, plus the per-layer
  intermediates named in `collect` (see hidden_states).
  With cfg.ensemble_size, params are stacked ensemble members (h3jax.model.ensemble).
  """
  if cfg.ensemble_size:
    from h3jax.model import ensemble
    return ensemble.forward(params, input_ids_BT, cfg, attention_mask_BT=attention_mask_BT,
                            positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, rng=rng,
                            return_aux=return_aux)
  hidden_BTD, aux = hidden_states(params, input_ids_BT, cfg, attention_mask_BT=attention_mask_BT,
                                  positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, rng=rng,
                                  collect=collect)
  logits_BTV = logits_from_hidden(params, hidden_BTD, cfg)
  if return_aux:
    return logits_BTV, dict(aux, hidden_BTD=hidden_BTD)
  return logits_BTV


# ----------------------------------------------------------------------------- cached decoding

def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Empty KV cache {"k", "v"}: [L, B, S, K, Dh] each ([M, L, ...] for an ensemble of M)."""
  if cfg.ensemble_size:
    from h3jax.model import ensemble
    return ensemble.init_cache(cfg, batch, max_len, dtype)
  dt = cfg.compute_dtype if dtype is None else dtype
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def forward_cached(params, input_ids_BT, positions_BT, cache, cache_index, key_mask_BS,
                   cfg: ModelConfig, kv_len=None, last_only=False):
  """Run T new tokens written at cache slots [cache_index, cache_index + T).

  key_mask_BS marks valid cache slots (prompt padding False); slot order is
  causal order. `kv_len` (static) limits attention to the first kv_len slots,
  which must cover cache_index + T: decoding early in a long cache then reads
  only the filled part. With `last_only` (static) only the last position's
  logits are computed ([B, 1, V]; a prefill needs no more). Returns
  (logits_BTV float32, new_cache).
  """
  if cfg.ensemble_size:
    from h3jax.model import ensemble
    return ensemble.forward_cached(params, input_ids_BT, positions_BT, cache, cache_index, key_mask_BS, cfg,
                                   kv_len=kv_len, last_only=last_only)
  B, T = input_ids_BT.shape
  S = kv_len or cache["k"].shape[2]
  slot_T = cache_index + jnp.arange(T)
  mask_BTS = (jnp.arange(S)[None, :] <= slot_T[:, None])[None] & key_mask_BS[:, None, :S]
  cos_BTH, sin_BTH = layers.rope_cos_sin(positions_BT, cfg)
  x_BTD = embed(params, input_ids_BT, cfg)
  token_mask_BT = jax.lax.dynamic_slice_in_dim(key_mask_BS, cache_index, T, axis=1)
  x_BTD, new_cache, _ = _run_layers(params["layers"], x_BTD, cos_BTH, sin_BTH, mask_BTS,
                                    token_mask_BT, cfg, cache=cache, cache_index=cache_index,
                                    kv_len=kv_len)
  if last_only:
    x_BTD = x_BTD[:, -1:]
  hidden_BTD = layers.rms_norm(x_BTD, params["final_norm"]["scale"], cfg.rms_norm_eps)
  return logits_from_hidden(params, hidden_BTD, cfg), new_cache


@functools.partial(jax.jit, static_argnames=("cfg", "return_aux"))
def forward_jit(params, input_ids_BT, cfg: ModelConfig, attention_mask_BT=None, positions_BT=None,
                return_aux=False):
  return forward(params, input_ids_BT, cfg, attention_mask_BT=attention_mask_BT,
                 positions_BT=positions_BT, return_aux=return_aux)
