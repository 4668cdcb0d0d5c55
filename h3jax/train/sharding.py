"""Device mesh (data x model) and the path -> PartitionSpec table for params and optimizer state.

Axes are `Auto` (classic GSPMD propagation; see jax-notes.md §5): the jitted
step gets explicit in/out shardings and XLA inserts the collectives. The
batch is split over `data`; matrices over `model` on their output (column)
or input (row) dimension as in Megatron. A dimension that the axis size does
not divide falls back to replicated, so any model fits any mesh.
"""

from __future__ import annotations

import re
from typing import Sequence, Tuple

import flax.traverse_util as tu
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from h3jax.train.optim import path_str

DATA, MODEL = "data", "model"

# First match wins; paths are slash-joined params paths.
PARAM_RULES: Tuple[Tuple[str, P], ...] = (
    (r"^embed/embedding$", P(MODEL, None)),
    (r"^lm_head/kernel$", P(None, MODEL)),
    (r"^layers/attn/[qkv]_proj/kernel$", P(None, None, MODEL)),
    (r"^layers/attn/[qkv]_proj/bias$", P(None, MODEL)),
    (r"^layers/attn/o_proj/kernel$", P(None, MODEL, None)),
    (r"^layers/mlp/(gate|up)_proj/kernel$", P(None, None, MODEL)),
    (r"^layers/mlp/down_proj/kernel$", P(None, MODEL, None)),
    (r"^layers/moe/experts/(gate|up)_proj/kernel$", P(None, None, None, MODEL)),
    (r"^layers/moe/experts/down_proj/kernel$", P(None, None, MODEL, None)),
    (r"/lora_b$", P()),  # LoRA factors are small: replicated
    (r"/lora_a$", P()),
    (r".*", P()),
)


def make_mesh(data: int = -1, model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, model) mesh; data=-1 takes all devices not used by `model`."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    if len(devices) % model:
      raise ValueError(f"model axis {model} does not divide the {len(devices)} devices")
    data = len(devices) // model
  if data * model > len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, have {len(devices)}")
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:data * model])


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drop axes that do not divide their dimension (and pad the spec to the rank)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, ax in zip(shape, entries[:len(shape)]):
    out.append(ax if ax is None or dim % mesh.shape[ax] == 0 else None)
  return P(*out)


def param_specs(params, mesh, rules=PARAM_RULES) -> dict:
  flat = tu.flatten_dict(params)
  out = {}
  for k, v in flat.items():
    p = path_str(k)
    spec = next(s for pattern, s in rules if re.search(pattern, p))
    out[k] = fit_spec(spec, v.shape, mesh)
  return tu.unflatten_dict(out)


def param_shardings(params, mesh, rules=PARAM_RULES) -> dict:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def _dict_path(path) -> str:
  return "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def tree_shardings_like(tree, params, mesh, rules=PARAM_RULES):
  """Shardings for any tree whose leaves sit under a params path (Adam moments): the param's
  spec when a params path is a suffix of the leaf's dict path and the shapes agree, else replicated."""
  flat_p = tu.flatten_dict(params)
  specs = {path_str(k): (s, flat_p[k].shape)
           for k, s in tu.flatten_dict(param_specs(params, mesh, rules)).items()}

  def one(path, leaf):
    dp = _dict_path(path)
    for p, (spec, shape) in specs.items():
      if (dp == p or dp.endswith("/" + p)) and tuple(getattr(leaf, "shape", ())) == tuple(shape):
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_shardings(batch, mesh):
  """Leading (batch) dim over `data` when it divides, else replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, fit_spec(P(DATA), x.shape, mesh)), batch)
