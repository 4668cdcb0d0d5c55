"""Device mesh (data, fsdp, expert, tensor) and the path -> PartitionSpec table for params and optimizer state.

Axes (`config.mesh.<axis>`; sizes multiply to the devices used, one of them may
be -1 = "all the rest"):
  data    pure data parallelism: the batch is split, params are replicated.
  fsdp    the batch is split AND every large matrix is split on its model
          dimension (ZeRO-3 / FSDP): XLA all-gathers a layer's weights where
          they are used and reduce-scatters their gradients.
  expert  the batch is split and the MoE experts (kernels and their LoRA
          factors) are split on their E dimension; with
          `moe_dispatch="expert_parallel"` tokens travel to their experts by
          all_to_all (h3jax.model.moe_dispatch).
  tensor  Megatron tensor parallelism: column (output-dim) / row (input-dim)
          splits of the attention and FFN matrices; the batch is replicated.

Axes are `Auto` (classic GSPMD sharding propagation, not `Explicit`): the jitted
step gets explicit in/out shardings and XLA inserts the collectives; the loop
traces under `jax.set_mesh(mesh)` so the expert-parallel `shard_map` finds the
`expert` axis. A matrix dimension that its axis size does not divide falls
back to replicated (a 259-token vocabulary on tensor=2), so any model fits any
valid mesh. The router [L, D, E] is replicated: it is D*E numbers per layer
and every device routes its own tokens over all E experts. Dense-layer LoRA
factors are replicated (r x (D + F) numbers); expert LoRA factors follow their
expert on the `expert` axis, so an expert's adapter lives with its weights.
Optimizer moments take their parameter's spec (`tree_shardings_like`).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from h3jax import rules as rules_lib
from h3jax.rules import path_str
from h3jax.model.params import flatten_dict, unflatten_dict

DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"
AXES = (DATA, FSDP, EXPERT, TENSOR)
BATCH_AXES = (DATA, FSDP, EXPERT)  # the axes that split the batch (tensor replicates it)
_E = EXPERT  # short names for the table below
_F = FSDP
_T = TENSOR


class MeshError(ValueError):
  """A mesh that cannot be built or does not fit the model / batch (the train CLI prints `error:`)."""


# First match wins; paths are slash-joined params paths. Stacked layers lead with L (never split).
PARAM_RULES: Tuple[Tuple[str, P], ...] = (
    ("embed/embedding", P(_T, None)),  # [V, D]: a lookup from a D-split table reshuffles activations
    ("lm_head/kernel", P(_F, _T)),  # [D, V]
    ("layers/attn/[qkv]_proj/kernel", P(None, _F, _T)),  # [L, D, H*Dh] column
    ("layers/attn/[qkv]_proj/bias", P(None, _T)),
    ("layers/attn/o_proj/kernel", P(None, _T, _F)),  # [L, H*Dh, D] row
    ("re:^layers/mlp/(gate|up)_proj/kernel$", P(None, _F, _T)),  # [L, D, F]
    ("layers/mlp/down_proj/kernel", P(None, _T, _F)),  # [L, F, D]
    ("re:^layers/moe/experts/(gate|up)_proj/kernel$", P(None, _E, _F, _T)),  # [L, E, D, F]
    ("layers/moe/experts/down_proj/kernel", P(None, _E, _T, _F)),  # [L, E, F, D]
    (r"re:^layers/moe/experts/\w+/lora_[ab]$", P(None, _E)),  # [L, E, in, r] / [L, E, r, out]
    ("layers/moe/router/kernel", P()),  # [L, D, E]
    ("re:/lora_[ab]$", P()),  # dense LoRA factors are small: replicated
    ("*", P()),  # norms, biases
)


def resolve_axes(shape: Mapping[str, int], n_devices: int) -> dict:
  """Axis sizes with -1 filled in. Raises one MeshError for a mesh that cannot be built.

  The product of the sizes must divide the device count; the mesh then uses the
  first product devices (8 devices, data=2 expert=2 -> a 4-device mesh).
  """
  unknown = set(shape) - set(AXES)
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; expected some of {AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad or len(free) > 1:
    raise MeshError(f"mesh {sizes}: sizes must be >= 1, with at most one -1 (the rest of the devices)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise MeshError(f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide the {n_devices} devices")
    sizes[free[0]] = n_devices // fixed
  elif n_devices % fixed:
    raise MeshError(f"mesh {sizes} needs {fixed} devices, which does not divide the {n_devices} devices")
  return sizes


def check_mesh(sizes: Mapping[str, int], *, num_experts: int = 0, dispatch: str = "", batch_size: int = 0,
               grad_accum: int = 1) -> None:
  """Model- and batch-dependent mesh checks (before anything compiles)."""
  m = sizes.get(EXPERT, 1)
  if m > 1 and not num_experts:
    raise MeshError(f"mesh expert={m} needs an MoE model (stage 'fusion'); this model has a dense FFN")
  if num_experts and num_experts % m:
    raise MeshError(f"mesh expert={m} does not divide the {num_experts} experts")
  if dispatch == "expert_parallel" and not num_experts:
    raise MeshError("fusion.dispatch='expert_parallel' needs an MoE model")
  split = math.prod(sizes.get(a, 1) for a in BATCH_AXES)
  if batch_size:
    micro = batch_size // max(grad_accum, 1)
    if micro % split:
      raise MeshError(f"the (micro)batch of {micro} rows does not divide over data x fsdp x expert = {split} "
                       f"devices; change train.batch_size / grad_accum_steps or the mesh")


def make_mesh(shape: Optional[Mapping[str, int]] = None, devices=None, **axes) -> jax.sharding.Mesh:
  """A 4-axis (data, fsdp, expert, tensor) Auto mesh: `make_mesh({"data": 2, "expert": 4})` or
  `make_mesh(data=2, expert=4)`; missing axes have size 1, default data=-1 (all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape if shape is not None else axes)
  if not shape:
    shape = {DATA: -1}
  sizes = resolve_axes(shape, len(devices))
  n = math.prod(sizes.values())
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices[:n])


def mesh_from_config(mesh_cfg, cfg=None, *, batch_size: int = 0, grad_accum: int = 1, devices=None):
  """The mesh of `config.mesh` (a ConfigDict or dict of axis sizes), checked against the model."""
  shape = {k: int(v) for k, v in dict(mesh_cfg).items()}
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_axes(shape, len(devices))
  if cfg is not None:
    check_mesh(sizes, num_experts=cfg.num_experts, dispatch=cfg.moe_dispatch, batch_size=batch_size,
               grad_accum=grad_accum)
  return make_mesh(sizes, devices)


def _axis_size(mesh, ax) -> int:
  names = ax if isinstance(ax, tuple) else (ax,)
  return math.prod(mesh.shape[a] for a in names)


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drop axes that do not divide their dimension or have size 1 (and pad the spec to the rank)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, ax in zip(shape, entries[:len(shape)]):
    if ax is not None:
      names = tuple(a for a in (ax if isinstance(ax, tuple) else (ax,)) if mesh.shape[a] > 1)
      ax = None if not names or dim % _axis_size(mesh, names) else (names[0] if len(names) == 1 else names)
    out.append(ax)
  return P(*out)


def param_specs(params, mesh, rules=PARAM_RULES) -> dict:
  flat = flatten_dict(params)
  out = {}
  for k, v in flat.items():
    p = path_str(k)
    spec = rules_lib.first_match(p, rules)
    out[k] = fit_spec(spec, v.shape, mesh)
  return unflatten_dict(out)


def param_shardings(params, mesh, rules=PARAM_RULES) -> dict:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def _dict_path(path) -> str:  # optax states nest params under tuples and named tuples: dict keys only
  return path_str([p for p in path if isinstance(p, jax.tree_util.DictKey)])


def tree_shardings_like(tree, params, mesh, rules=PARAM_RULES):
  """Shardings for any tree whose leaves sit under a params path (Adam moments): the param's
  spec when a params path is a suffix of the leaf's dict path and the shapes agree, else replicated."""
  flat_p = flatten_dict(params)
  specs = {path_str(k): (s, flat_p[k].shape)
           for k, s in flatten_dict(param_specs(params, mesh, rules)).items()}

  def one(path, leaf):
    dp = _dict_path(path)
    for p, (spec, shape) in specs.items():
      if (dp == p or dp.endswith("/" + p)) and tuple(getattr(leaf, "shape", ())) == tuple(shape):
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_shardings(batch, mesh):
  """Leading (batch) dim over data x fsdp x expert when it divides, else replicated."""
  return jax.tree.map(lambda x: NamedSharding(mesh, fit_spec(P(BATCH_AXES), x.shape, mesh)), batch)
