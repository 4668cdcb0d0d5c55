"""Building blocks of a Llama-family decoder, as pure functions.

Numerics follow transformers' Llama exactly where it matters for parity:
RMSNorm upcasts to float32 and casts back *before* the weight multiply, RoPE
angles are computed in float32 and rotate split halves (never interleaved),
and GQA groups query head h with kv head h // R (a reshape, never a tile).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.config import ModelConfig, RopeConfig
from h3jax.kernels import decode_attention
from h3jax.model import panels


def rms_norm(x_BTD, scale_D, eps: float):
  x32_BTD = x_BTD.astype(jnp.float32)
  var_BT1 = jnp.mean(jnp.square(x32_BTD), axis=-1, keepdims=True)
  y_BTD = (x32_BTD * jax.lax.rsqrt(var_BT1 + eps)).astype(x_BTD.dtype)
  return scale_D.astype(x_BTD.dtype) * y_BTD


def _default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
  return (1.0 / (theta ** exponents.astype(np.float64))).astype(np.float32)  # [Dh/2]


def _llama3_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  inv = _default_inv_freq(rope.theta, head_dim).astype(np.float64)
  old_ctx = rope.original_max_position_embeddings
  low_wl, high_wl = old_ctx / rope.low_freq_factor, old_ctx / rope.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
  smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  medium = (wavelen >= high_wl) & (wavelen <= low_wl)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(cfg: ModelConfig, positions_BT=None):
  """Inverse frequencies [Dh/2] (f32). `dynamic` depends on the largest position seen."""
  rope, dh = cfg.rope, cfg.head_dim
  if rope.rope_type in ("default", "linear"):
    return jnp.asarray(_default_inv_freq(rope.theta, dh))
  if rope.rope_type == "llama3":
    return jnp.asarray(_llama3_inv_freq(rope, dh))
  # dynamic NTK, stateless form of transformers' update: rescale the base once the
  # sequence outgrows max_position_embeddings.
  max_pos = cfg.max_position_embeddings
  seq_len = jnp.maximum(jnp.max(positions_BT) + 1, max_pos).astype(jnp.float32)
  base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dh / (dh - 2))
  exponents = jnp.asarray(np.arange(0, dh, 2).astype(np.float32) / dh)
  return 1.0 / (base ** exponents)


def rope_cos_sin(positions_BT, cfg: ModelConfig):
  """cos, sin of shape [B, T, Dh] in float32."""
  inv_freq = rope_inv_freq(cfg, positions_BT)  # [Dh/2]
  pos_BT = positions_BT.astype(jnp.float32)
  if cfg.rope.rope_type == "linear":
    pos_BT = pos_BT / cfg.rope.factor
  angles_BTd = pos_BT[..., None] * inv_freq
  emb_BTD = jnp.concatenate([angles_BTd, angles_BTd], axis=-1)  # [B, T, Dh]
  return jnp.cos(emb_BTD), jnp.sin(emb_BTD)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
  """Split-half rotation: x*cos + rotate_half(x)*sin, in x's dtype (as HF)."""
  cos_BT1H = cos_BTH[:, :, None, :].astype(x_BTNH.dtype)
  sin_BT1H = sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
  x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
  rotated_BTNH = jnp.concatenate([-x2, x1], axis=-1)
  return x_BTNH * cos_BT1H + rotated_BTNH * sin_BT1H


def _fmix32(x):
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 whose output bits each depend on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def dropout_keep(rng, rate: float, shape) -> jax.Array:
  """Bernoulli(1 - rate) keep mask of `shape`, a pure function of the key.

  Not jax.random.bernoulli: threefry costs ~80 integer ops per element, and the LoRA inputs' masks
  (three per FFN, four more with attention targets, every layer, every step) cost more than the matmuls
  they feed — measured 72 ms vs 45 ms for one [2048, 1536] input and its 1536x576 projection on CPU.
  Instead two uint32 words drawn from the key seed a counter hash (a Weyl sequence through
  MurmurHash3's finalizer, re-mixed with the second word so that two keys' masks are not shifts of
  one another): ~12 ops per element, 2 ms. P(keep) = 1 - floor(rate * 2^32) / 2^32.
  """
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  n = math.prod(shape)
  x = jax.lax.iota(jnp.uint32, n) * jnp.uint32(0x9E3779B9) + seed[0]
  x = _fmix32(_fmix32(x) ^ seed[1])
  return (x >= jnp.uint32(min(int(rate * 2.0 ** 32), 2 ** 32 - 1))).reshape(shape)


def lora_input(x, keep, cfg: ModelConfig):
  """The LoRA branch's input: x, or with dropout (keep: the dropout_keep mask) x * keep / (1 - rate)."""
  if keep is None:
    return x
  return jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)


def lora_term(x_MI, a_IR, b_RO, scale: float):
  """scale * (x @ a) @ b, the LoRA term of a linear (scaled on the rank-r side: r values per token, not out).
  Leading axes batch as in jnp.matmul (experts: x [E, M, I] or a shared [M, I], a [E, I, r], b [E, r, O]).

  Its own backward because of how XLA:CPU runs lora_a's gradient: formed as autodiff does, x^T @ dh with the
  [in, r] result, it took 1.55 ms (in 576) and 3.78 ms (in 1536) at 2048 tokens and r = 8, against 0.29 / 0.56
  ms for dh^T @ x, the same product with the [r, in] result (3 experts x 1400 tokens: 2.82 / 7.65 ms against
  0.46 / 1.10 ms); XLA rewrites a transpose of that product back into the slow form, so an optimization
  barrier sits between them. SmolLM2's LoRA step (gate / up / down, 8 x 256 tokens, 4 interleaved rounds):
  12.0-12.6 s against 12.8-14.1 s, faster in every round. The gradients equal autodiff's and a float64
  reference (tests/test_layers.py).
  """
  # Inside shard_map each gradient must vary along the same mesh axes as its input (as autodiff's transposes
  # make it): the inputs' axes are read here, where they are known, and handed to the backward.
  vma = tuple(tuple(sorted(_varying_axes(v))) for v in (x_MI, a_IR, b_RO))
  return _lora_term(x_MI, a_IR, b_RO, scale, vma)


def _varying_axes(v) -> frozenset:
  """The shard_map mesh axes v varies along (empty outside shard_map)."""
  return frozenset(jax.typeof(v).manual_axis_type.varying)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lora_term(x_MI, a_IR, b_RO, scale, vma):
  return (scale * (x_MI @ a_IR)) @ b_RO


def _lora_term_fwd(x_MI, a_IR, b_RO, scale, vma):
  hs_MR = scale * (x_MI @ a_IR)
  return hs_MR @ b_RO, (x_MI, a_IR, b_RO, hs_MR)


def _typed(grad, axes):
  """grad summed over the mesh axes it varies along beyond `axes`, and marked varying along the rest."""
  have, want = _varying_axes(grad), frozenset(axes)
  if have - want:
    grad = jax.lax.psum(grad, tuple(sorted(have - want)))
  if want - have:
    grad = jax.lax.pcast(grad, tuple(sorted(want - have)), to="varying")
  return grad


def _lora_term_bwd(scale, vma, res, g_MO):
  x_MI, a_IR, b_RO, hs_MR = res
  t = lambda z: jnp.swapaxes(z, -1, -2)
  db_RO = t(hs_MR) @ g_MO
  dh_MR = scale * (g_MO @ t(b_RO))
  da_RI = jax.lax.optimization_barrier(t(dh_MR) @ x_MI)
  dx_MI = dh_MR @ t(a_IR)
  if dx_MI.ndim > x_MI.ndim:  # x shared by the leading (expert) axes: its gradient sums over them
    dx_MI = dx_MI.sum(axis=tuple(range(dx_MI.ndim - x_MI.ndim)))
  return tuple(_typed(d, axes) for d, axes in zip((dx_MI, t(da_RI), db_RO), vma))


_lora_term.defvjp(_lora_term_fwd, _lora_term_bwd)


def linears(ps, x_BTI, cfg: ModelConfig, rngs=None) -> list:
  """[linear(p, x_BTI, cfg, rng) for p, rng in zip(ps, rngs)], the base matmuls of packed decode params in one
  kernel call (model/panels.py): the weights that share an input (q / k / v, gate / up) go together."""
  dt = cfg.compute_dtype
  rngs = rngs if rngs is not None else (None,) * len(ps)
  # Every dot on one [tokens, in] matrix: with the token axes apart ([B, T, in]) the backward's weight
  # gradients (kernel, lora_a) contract two axes, which XLA:CPU runs several times slower. Measured
  # (SmolLM2, B=4 x 256): a full fine-tune step 9.07 -> 7.52 s, a LoRA step 0.92x -> 0.75x a full step.
  x_NI = x_BTI.reshape(-1, x_BTI.shape[-1]).astype(dt)
  outs = []
  for p, rng, y_NO in zip(ps, rngs, panels.matmuls(ps, x_NI, dt)):
    if "bias" in p:
      y_NO = y_NO + p["bias"].astype(dt)
    if "lora_a" in p:
      keep = dropout_keep(rng, cfg.lora_dropout, x_NI.shape) if rng is not None and cfg.lora_dropout > 0 else None
      y_NO = y_NO + lora_term(lora_input(x_NI, keep, cfg), p["lora_a"].astype(dt), p["lora_b"].astype(dt),
                              cfg.lora_scale)
    outs.append(y_NO.reshape(*x_BTI.shape[:-1], y_NO.shape[-1]))
  return outs


def linear(p: dict, x_BTI, cfg: ModelConfig, rng=None):
  """y = x @ kernel (+ bias) (+ lora_scale * dropout(x) @ lora_a @ lora_b); `kernel_panels` for kernel in
  decode params (model/panels.py)."""
  return linears((p,), x_BTI, cfg, (rng,))[0]


def swiglu_mlp(p: dict, x_BTD, cfg: ModelConfig, rng=None, taps=None):
  """SwiGLU FFN; `taps` (a dict, filled while tracing) receives down_proj's input as "down_in"."""
  rngs = jax.random.split(rng, 3) if rng is not None else (None,) * 3
  gate_BTF, up_BTF = linears((p["gate_proj"], p["up_proj"]), x_BTD, cfg, rngs[:2])
  act_BTF = jax.nn.silu(gate_BTF) * up_BTF
  if taps is not None:
    taps["down_in"] = act_BTF
  return linear(p["down_proj"], act_BTF, cfg, rngs[2])


def _masked_softmax(scores_BKRTS, mask_BTS, dt):
  """Softmax over the keys, masked scores set to float32's min (a query with no key attends uniformly)."""
  scores_BKRTS = jnp.where(mask_BTS[:, None, None], scores_BKRTS, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores_BKRTS, axis=-1).astype(dt)


def attend_in_place(q_BTKRH, k_BSKH, v_BSKH, mask_BTS, cfg: ModelConfig):
  """Softmax attention as einsums over the arrays as they are laid out ([B, T, K, R, Dh] queries, [B, S, K, Dh]
  keys and values from the cache); the cached path (prefill and decode). Returns [B, T, H * Dh]."""
  B, T, K, R, Dh = q_BTKRH.shape
  scores_BKRTS = jnp.einsum("btkrh,bskh->bkrts", q_BTKRH, k_BSKH.astype(q_BTKRH.dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(Dh)
  probs_BKRTS = _masked_softmax(scores_BKRTS, mask_BTS, cfg.compute_dtype)
  out_BTKRH = jnp.einsum("bkrts,bskh->btkrh", probs_BKRTS, v_BSKH.astype(cfg.compute_dtype))
  return out_BTKRH.reshape(B, T, K * R * Dh)


def attend_heads_first(q_BTKRH, k_BSKH, v_BSKH, mask_BTS, cfg: ModelConfig):
  """attend_in_place with the heads moved in front and the R query heads of a kv head stacked on the token
  axis: two batched GEMMs of [R*T, Dh] x [Dh, S] and [R*T, S] x [S, Dh] per (b, kv head); the training and
  uncached path. `benchmarks/step_gemms.py` times both: SmolLM2's 30 layers' attention forward+backward at
  B=4, T=256 took 0.37 s in place and 0.31 s heads first, torch's fused SDPA 0.54 s (an earlier probe of the
  same: 0.74 / 0.52 / 0.55 s). Returns [B, T, H * Dh]."""
  B, T, K, R, Dh = q_BTKRH.shape
  S = k_BSKH.shape[1]
  q_BKMH = q_BTKRH.transpose(0, 2, 3, 1, 4).reshape(B, K, R * T, Dh)  # m = r * T + t
  k_BKSH = k_BSKH.astype(q_BKMH.dtype).transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.astype(cfg.compute_dtype).transpose(0, 2, 1, 3)
  scores_BKMS = jnp.einsum("bkmh,bksh->bkms", q_BKMH, k_BKSH,
                           preferred_element_type=jnp.float32) / math.sqrt(Dh)
  probs_BKMS = _masked_softmax(scores_BKMS.reshape(B, K, R, T, S), mask_BTS, cfg.compute_dtype).reshape(
      B, K, R * T, S)
  out_BKMH = jnp.einsum("bkms,bksh->bkmh", probs_BKMS, v_BKSH)
  return out_BKMH.reshape(B, K, R, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, K * R * Dh)


def _cached_attend(q_BTKRH, k_LBSKH, v_LBSKH, mask_BTS, layer, S: int, cfg: ModelConfig):
  """attend_in_place over the first S slots of layer `layer` of the stacked caches [L, B, S_max, K, Dh]."""
  B, _, K, _, Dh = q_BTKRH.shape
  start = (layer,) + (jnp.int32(0),) * 4
  k_BSKH = jax.lax.dynamic_slice(k_LBSKH, start, (1, B, S, K, Dh))[0]
  v_BSKH = jax.lax.dynamic_slice(v_LBSKH, start, (1, B, S, K, Dh))[0]
  return attend_in_place(q_BTKRH, k_BSKH, v_BSKH, mask_BTS, cfg)


def attention(p: dict, x_BTD, cos_BTH, sin_BTH, mask_BTS, cfg: ModelConfig, *,
              kv_cache=None, cache_index=None, layer=0, kv_len=None, rng=None, taps=None):
  """Causal GQA self-attention.

  mask_BTS: bool, True where query t may attend key s (causality and padding
  already folded in by the caller). With `kv_cache=(k_LBSKH, v_LBSKH)`, the
  cache of every layer stacked, this layer's T new keys/values are written in
  place at [layer, :, cache_index] (only T slots move, however long the cache)
  and attention runs over the first `kv_len` slots (default all S; mask_BTS
  then has kv_len columns). The updated stacked cache is returned.
  """
  B, T, _ = x_BTD.shape
  H, K, Dh, R = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.q_per_kv
  rngs = jax.random.split(rng, 4) if rng is not None else (None,) * 4
  q_BTE, k_BTE, v_BTE = linears((p["q_proj"], p["k_proj"], p["v_proj"]), x_BTD, cfg, rngs[:3])
  q_BTNH = q_BTE.reshape(B, T, H, Dh)
  k_BTKH = k_BTE.reshape(B, T, K, Dh)
  v_BTKH = v_BTE.reshape(B, T, K, Dh)
  q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
  k_BTKH = apply_rope(k_BTKH, cos_BTH, sin_BTH)
  q_BTKRH = q_BTNH.reshape(B, T, K, R, Dh)  # query head h uses kv head h // R
  new_cache = None
  if kv_cache is not None:
    k_LBSKH, v_LBSKH = kv_cache
    at = tuple(jnp.asarray(i, jnp.int32) for i in (layer, 0, cache_index, 0, 0))
    k_LBSKH = jax.lax.dynamic_update_slice(k_LBSKH, k_BTKH[None].astype(k_LBSKH.dtype), at)
    v_LBSKH = jax.lax.dynamic_update_slice(v_LBSKH, v_BTKH[None].astype(v_LBSKH.dtype), at)
    new_cache = (k_LBSKH, v_LBSKH)
    S = kv_len or k_LBSKH.shape[2]
    # One query per row with packed decode params (float32, one CPU device): the native kernel reads the
    # layer's keys and values in place; prefill and every other case run XLA's einsums on the layer's slice.
    if T == 1 and "kernel_panels" in p["q_proj"] and decode_attention.fits(q_BTKRH[:, 0], k_LBSKH):
      xla = lambda q, k, v, m, l: _cached_attend(q[:, None], k, v, m[:, None], l, S, cfg)[:, 0]
      o_in_BTE = decode_attention.attend(q_BTKRH[:, 0], k_LBSKH, v_LBSKH, mask_BTS[:, 0], at[0], xla)[:, None]
    else:
      o_in_BTE = _cached_attend(q_BTKRH, k_LBSKH, v_LBSKH, mask_BTS, at[0], S, cfg)
  else:
    o_in_BTE = attend_heads_first(q_BTKRH, k_BTKH, v_BTKH, mask_BTS, cfg)
  if taps is not None:  # o_proj's input, for callers that observe activations (RegMean's Grams)
    taps["o_in"] = o_in_BTE
  return linear(p["o_proj"], o_in_BTE, cfg, rngs[3]), new_cache
