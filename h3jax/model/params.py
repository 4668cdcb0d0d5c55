"""The params pytree layout, its shapes, and a random initialiser.

A params tree is a plain nested dict with Flax-style leaf names. Layers are
stacked on a leading L axis (run with `jax.lax.scan`):

  embed/embedding                      [V, D]
  layers/attn_norm/scale               [L, D]
  layers/attn/{q_proj}/kernel          [L, D, H*Dh]     (+ bias [L, H*Dh] if attention_bias)
  layers/attn/{k_proj,v_proj}/kernel   [L, D, K*Dh]     (+ bias [L, K*Dh] if attention_bias)
  layers/attn/o_proj/kernel            [L, H*Dh, D]     (+ bias [L, D] if attention_out_bias)
  layers/mlp_norm/scale                [L, D]
  dense FFN:
  layers/mlp/{gate_proj,up_proj}/kernel [L, D, F]
  layers/mlp/down_proj/kernel          [L, F, D]
  MoE FFN (cfg.num_experts = E > 0) instead of layers/mlp:
  layers/moe/router/kernel             [L, D, E]
  layers/moe/experts/{gate_proj,up_proj}/kernel [L, E, D, F]
  layers/moe/experts/down_proj/kernel  [L, E, F, D]
  final_norm/scale                     [D]
  lm_head/kernel                       [D, V]           (absent if tie_word_embeddings)

Kernels are [in, out] (HF nn.Linear weights transposed). Head dims stay flat
(H*Dh) so every linear is a 2-D matrix per layer, which is what LoRA and the
merge methods operate on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.config import ModelConfig, resolve_dtype


def param_shapes(cfg: ModelConfig) -> dict:
  """Nested dict of shape tuples describing the params tree for `cfg`."""
  V, D, F, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = {
      "q_proj": {"kernel": (L, D, H * Dh)},
      "k_proj": {"kernel": (L, D, K * Dh)},
      "v_proj": {"kernel": (L, D, K * Dh)},
      "o_proj": {"kernel": (L, H * Dh, D)},
  }
  if cfg.attention_bias:
    attn["q_proj"]["bias"] = (L, H * Dh)
    attn["k_proj"]["bias"] = (L, K * Dh)
    attn["v_proj"]["bias"] = (L, K * Dh)
  if cfg.attention_out_bias:
    attn["o_proj"]["bias"] = (L, D)
  layers = {"attn_norm": {"scale": (L, D)}, "attn": attn, "mlp_norm": {"scale": (L, D)}}
  if cfg.is_moe:
    E = cfg.num_experts
    layers["moe"] = {
        "router": {"kernel": (L, D, E)},
        "experts": {
            "gate_proj": {"kernel": (L, E, D, F)},
            "up_proj": {"kernel": (L, E, D, F)},
            "down_proj": {"kernel": (L, E, F, D)},
        },
    }
  else:
    layers["mlp"] = {
        "gate_proj": {"kernel": (L, D, F)},
        "up_proj": {"kernel": (L, D, F)},
        "down_proj": {"kernel": (L, F, D)},
    }
  shapes = {"embed": {"embedding": (V, D)}, "layers": layers, "final_norm": {"scale": (D,)}}
  if not cfg.tie_word_embeddings:
    shapes["lm_head"] = {"kernel": (D, V)}
  return shapes


def abstract_params(cfg: ModelConfig, dtype="float32") -> dict:
  """ShapeDtypeStruct tree (no allocation), e.g. for loaders and Orbax restore."""
  dt = resolve_dtype(dtype)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), param_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, key: jax.Array, dtype="float32", std: float = 0.02) -> dict:
  """Random params: N(0, std^2) matrices, unit norm scales, zero biases."""
  dt = resolve_dtype(dtype)
  shapes = param_shapes(cfg)
  flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
  keys = jax.random.split(key, len(flat))
  out = {}
  for (path, shape), k in zip(flat, keys):
    name = path[-1].key
    if name == "scale":
      leaf = jnp.ones(shape, dt)
    elif name == "bias":
      leaf = jnp.zeros(shape, dt)
    else:
      leaf = (std * jax.random.normal(k, shape, jnp.float32)).astype(dt)
    node = out
    for p in path[:-1]:
      node = node.setdefault(p.key, {})
    node[name] = leaf
  return out


def num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def flatten_dict(tree: dict) -> dict:
  """{path tuple: leaf} of a nested dict, in insertion order; empty dicts vanish (what
  flax.traverse_util.flatten_dict returns, without depending on flax)."""
  out = {}

  def walk(node: dict, prefix: tuple):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, prefix + (key,))
      else:
        out[prefix + (key,)] = value

  walk(tree, ())
  return out


def unflatten_dict(flat: dict) -> dict:
  """The nested dict of `flatten_dict`'s {path tuple: leaf}."""
  out = {}
  for path, leaf in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out
