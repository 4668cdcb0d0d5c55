"""Decode params with weights packed as column panels for the CPU kernel (h3jax.kernels.cpu_matmul).

`llama.unstack_layers` already makes a per-layer copy of the weights for decoding; on a single CPU device
with float32 compute it also packs every layer kernel named by PANEL_RULES, and the vocabulary projection,
into `kernel_panels` [out / 8, in, 8] in place of `kernel`. `matmul` and `kernel_shape` read either form,
so the layers, the MoE experts and the head run unchanged on packed or plain params.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from h3jax import rules
from h3jax.config import ModelConfig
from h3jax.kernels import cpu_matmul, native

# Which leaves of a layer tree are packed (paths like "attn/q_proj/kernel", "moe/experts/0/up_proj/kernel").
# The router is read by `moe.route` as a matrix of its own (and has E columns, rarely a multiple of 8).
PANEL_RULES = (
    ("re:router/kernel$", False),
    ("re:(^|/)kernel$", True),
)


def matmuls(ps, x_NI, dt) -> tuple:
  """x [N, in] @ each p's weight (`kernel` [in, out] or `kernel_panels`), in dtype dt. Weights that are all
  packed go to the kernel in one call (q / k / v, gate / up share their input)."""
  x_NI = x_NI.astype(dt)
  if ps and all("kernel_panels" in p for p in ps):
    return cpu_matmul.panel_matmuls(x_NI, [p["kernel_panels"].astype(dt) for p in ps])
  return tuple(matmul(p, x_NI, dt) for p in ps)


def matmul(p: dict, x_NI, dt):
  """x [N, in] @ p's weight, `kernel` [in, out] or `kernel_panels`, in dtype dt."""
  if "kernel_panels" in p:
    return cpu_matmul.panel_matmul(x_NI.astype(dt), p["kernel_panels"].astype(dt))
  return x_NI.astype(dt) @ p["kernel"].astype(dt)


def kernel_shape(p: dict) -> tuple:
  """Shape [..., in, out] of p's weight in either form."""
  if "kernel_panels" in p:
    *lead, P, I, L = p["kernel_panels"].shape
    return (*lead, I, P * L)
  return tuple(p["kernel"].shape)


def _on_one_cpu(x) -> bool:
  if isinstance(x, jax.Array):
    devices = x.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"
  return isinstance(x, np.ndarray) and jax.default_backend() == "cpu"


def should_pack(params, cfg: ModelConfig) -> bool:
  """Pack for the CPU kernel: float32 compute, every leaf on one CPU device, the kernel built."""
  if not native.enabled() or cfg.ensemble_size or jnp.dtype(cfg.compute_dtype) != jnp.float32:
    return False
  if not all(_on_one_cpu(x) for x in jax.tree.leaves(params)):
    return False
  return cpu_matmul.available()


def _pack_leafdict(path: str, d: dict) -> dict:
  k = d.get("kernel")
  if k is None or not rules.first_match(path + "/kernel", PANEL_RULES, False) or not cpu_matmul.packable(k):
    return d
  out = {n: v for n, v in d.items() if n != "kernel"}
  out["kernel_panels"] = cpu_matmul.pack_panels(k)
  return out


def _pack_tree(tree, path: str = ""):
  if isinstance(tree, dict):
    tree = _pack_leafdict(path, tree)
    return {n: _pack_tree(v, f"{path}/{n}" if path else str(n)) for n, v in tree.items()}
  if isinstance(tree, (tuple, list)):
    return type(tree)(_pack_tree(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(tree))
  return tree


_pack_layer = jax.jit(_pack_tree)  # one layer per call: one small program serves every layer of a model


@functools.partial(jax.jit, static_argnames=("tied",))
def _pack_head(head, tied: bool):
  return cpu_matmul.pack_panels(head.T if tied else head)  # tied: the embedding [V, D] is the head's [D, V]


def _needs_packing(layer) -> bool:
  """Whether a layer tree still holds a kernel that PANEL_RULES packs (layers share one structure)."""
  return any(rules.first_match(rules.path_str(path), PANEL_RULES, False) and cpu_matmul.packable(x)
             for path, x in jax.tree_util.tree_flatten_with_path(layer)[0])


def pack(params, cfg: ModelConfig, consume: bool = False) -> dict:
  """params (layers unstacked) with the layer kernels and the head in panels. Idempotent, and returns
  `params` itself when nothing is left to pack (generation unstacks again at every call).

  consume: `params` is the caller's own copy (unstack_layers' fresh one): its layers are taken out of it
  and each is dropped once packed. Host memory growth of SmolLM2's unstack and pack (one process each):
  0.91-0.94 GB so, 1.17 GB packing per layer without dropping, 1.25 GB in one whole-model program."""
  tied = cfg.tie_word_embeddings
  head_p = params.get("lm_head", {})
  head = params["embed"]["embedding"] if tied else head_p.get("kernel")
  pack_head = ("kernel_panels" not in head_p and head is not None and head.dtype == jnp.float32
               and head.shape[0 if tied else 1] % cpu_matmul.LANES == 0)
  pack_layers = bool(params["layers"]) and _needs_packing(params["layers"][0])
  if not (pack_head or pack_layers):
    return params
  out = dict(params)
  if pack_layers:
    todo = list(params["layers"])
    if consume:
      params["layers"] = out["layers"] = None
    packed = []
    while todo:
      packed.append(_pack_layer(todo.pop(0)))
    out["layers"] = tuple(packed)
  if pack_head:
    out["lm_head"] = {"kernel_panels": _pack_head(head, tied)}
  return out
