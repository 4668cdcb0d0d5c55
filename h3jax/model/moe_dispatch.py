"""MoE dispatch backends over per-expert SwiGLU weights: capacity, ragged, expert-parallel, sparse.

Every backend takes routed tokens (x_ND in compute dtype, topi_NK, combine_NK =
renormalised top-k weights already zeroed for padding, valid_N) and returns
y_ND (float32). `h3jax.model.moe` owns routing and the dense oracle.

Capacity semantics (`capacity`, `expert_parallel`):
  * C = ceil(capacity_factor * N * k / E) slots per expert (at most N). A
    capacity_factor <= 0 means dropless: C = N, the most any expert can get,
    since the top-k experts of one token are distinct.
  * Priority: every token's top-1 choice is placed before any top-2 choice
    (assignments flattened choice-major), then in token order; padding tokens
    take no slot.
  * A dropped choice contributes nothing and the surviving weights are NOT
    renormalised (GShard/Switch convention): the layer stays the same function
    of the router as `dense`, minus the dropped terms, and a token that loses
    every choice outputs 0 (the residual stream carries it).

`sparse` (dropless, the inference default) reads only the experts some token
chose; it takes the experts stacked ([E, ...] leaves) or split into a tuple of
E per-expert trees (`split_experts`, what cached decoding uses).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from h3jax.config import ModelConfig
from h3jax.model import layers, panels

BACKENDS = ("dense", "capacity", "ragged", "expert_parallel", "sparse")
EXPERT_AXIS = "expert"


# ----------------------------------------------------------------------------- expert compute

def expert_linear(p: dict, x, keep_EMI, cfg: ModelConfig):
  """Per-expert x @ kernel (+ LoRA). x is [M, I] (shared by all experts) or [E, M, I] -> [E, M, O]."""
  dt = cfg.compute_dtype
  x = x.astype(dt)
  sub = "mi" if x.ndim == 2 else "emi"
  y_EMO = jnp.einsum(f"{sub},eio->emo", x, p["kernel"].astype(dt))
  if "lora_a" in p:  # layers.lora_term: its backward forms lora_a's gradient as [E, r, in]
    xl = layers.lora_input(x, keep_EMI, cfg)  # broadcasts a shared x against [E, M, I] masks
    y_EMO = y_EMO + layers.lora_term(xl, p["lora_a"].astype(dt), p["lora_b"].astype(dt), cfg.lora_scale)
  return y_EMO


def expert_swiglu(p_experts: dict, x, keeps_E, cfg: ModelConfig):
  """down(silu(gate x) * up x) for every expert: x [M, D] or [E, M, D] -> [E, M, D]."""
  kp = (lambda n: None) if keeps_E is None else keeps_E.get
  gate_EMF = expert_linear(p_experts["gate_proj"], x, kp("gate_proj"), cfg)
  up_EMF = expert_linear(p_experts["up_proj"], x, kp("up_proj"), cfg)
  return expert_linear(p_experts["down_proj"], jax.nn.silu(gate_EMF) * up_EMF, kp("down_proj"), cfg)


def _ragged_dot(x_MI, w_EIO, group_sizes_E):
  """jax.lax.ragged_dot; under an Explicit mesh on replicated operands inside shard_map.

  jax 0.10 has no Explicit-sharding rule for ragged_dot_general (nor for its
  transpose), so the grouped matmul runs replicated in a manual region.
  """
  m = jax.sharding.get_abstract_mesh()
  if m is None or m.empty or not any(t == AxisType.Explicit for t in m.axis_types):
    return jax.lax.ragged_dot(x_MI, w_EIO, group_sizes_E)
  rep = lambda a: jax.sharding.reshard(a, P())
  f = jax.shard_map(jax.lax.ragged_dot, in_specs=(P(), P(), P()), out_specs=P())
  return f(rep(x_MI), rep(w_EIO), rep(group_sizes_E))


def _ragged_linear(p: dict, x_MI, group_sizes_E, keep_MI, cfg: ModelConfig):
  dt = cfg.compute_dtype
  x_MI = x_MI.astype(dt)
  y_MO = _ragged_dot(x_MI, p["kernel"].astype(dt), group_sizes_E)
  if "lora_a" in p:
    h_MR = _ragged_dot(layers.lora_input(x_MI, keep_MI, cfg), p["lora_a"].astype(dt), group_sizes_E)
    y_MO = y_MO + cfg.lora_scale * _ragged_dot(h_MR, p["lora_b"].astype(dt), group_sizes_E)
  return y_MO


# ----------------------------------------------------------------------------- capacity

def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Slots per expert; capacity_factor <= 0 gives the dropless C = num_tokens."""
  if capacity_factor <= 0:
    return num_tokens
  c = math.ceil(capacity_factor * num_tokens * k / num_experts)
  return max(1, min(c, num_tokens))


def capacity_slots(topi_NK, valid_N, num_experts: int, C: int):
  """Slot of every assignment a = j * N + n (choice-major, so top-1 fills first).

  Returns slot_A (E*C where dropped), kept_A bool, src_S (assignment feeding
  each of the E*C slots; A where empty).
  """
  N, K = topi_NK.shape
  E, A = num_experts, N * K
  e_A = topi_NK.T.reshape(A)
  valid_A = jnp.tile(valid_N, K)
  onehot_AE = jax.nn.one_hot(e_A, E, dtype=jnp.int32) * valid_A[:, None].astype(jnp.int32)
  pos_A = jnp.sum(jnp.cumsum(onehot_AE, axis=0) * onehot_AE, axis=-1) - 1
  kept_A = valid_A & (pos_A < C)
  slot_A = jnp.where(kept_A, e_A * C + pos_A, E * C)
  src_S = jnp.full((E * C,), A, jnp.int32).at[slot_A].set(jnp.arange(A, dtype=jnp.int32), mode="drop")
  return slot_A, kept_A, src_S


def capacity_ffn(p_experts, x_ND, topi_NK, combine_NK, valid_N, keeps, C: int, cfg: ModelConfig,
                 expert_fn=None):
  """Scatter tokens into [E, C, D], run the experts batched, gather back and combine.

  expert_fn(x_ECD, keeps_ECI) -> out_ECD replaces the local expert run
  (expert_parallel wraps it in all_to_all). Returns (y_ND f32, dropped_N int32).
  """
  N, K = topi_NK.shape
  D, A = x_ND.shape[-1], N * K
  E = p_experts["gate_proj"]["kernel"].shape[0] if expert_fn is None else cfg.num_experts
  slot_A, kept_A, src_S = capacity_slots(topi_NK, valid_N, E, C)
  token_S = jnp.where(src_S < A, src_S % N, N)  # N = empty slot -> zero row
  x_ECD = jnp.take(x_ND, token_S, axis=0, mode="fill", fill_value=0).reshape(E, C, D)
  keeps_E = None
  if keeps is not None:
    keeps_E = {n: jnp.take(jnp.swapaxes(m_NKI, 0, 1).reshape(A, -1), src_S, axis=0, mode="fill",
                           fill_value=True).reshape(E, C, -1) for n, m_NKI in keeps.items()}
  if expert_fn is None:
    out_ECD = expert_swiglu(p_experts, x_ECD, keeps_E, cfg)
  else:
    out_ECD = expert_fn(x_ECD, keeps_E)
  out_KND = jnp.take(out_ECD.reshape(E * C, D), slot_A, axis=0, mode="fill", fill_value=0).reshape(K, N, D)
  kept_KN = kept_A.reshape(K, N)
  w_KN = jnp.where(kept_KN, combine_NK.T, 0.0).astype(out_KND.dtype)
  y_ND = jnp.einsum("knd,kn->nd", out_KND, w_KN, preferred_element_type=jnp.float32)
  dropped_N = jnp.sum(valid_N[None, :] & ~kept_KN, axis=0).astype(jnp.int32)
  return y_ND, dropped_N


# ----------------------------------------------------------------------------- ragged

def ragged_ffn(p_experts, x_ND, topi_NK, combine_NK, valid_N, keeps, cfg: ModelConfig):
  """Dropless: sort the N*k assignments by expert, grouped matmuls with `jax.lax.ragged_dot`.

  Under an Explicit mesh the grouped matmuls run on replicated operands
  (ragged_dot has no sharding rule yet): use expert_parallel for sharded MoE.
  Padding assignments sort after every expert group (key E), so ragged_dot
  leaves their rows out of every group.
  """
  N, K = topi_NK.shape
  E, A = cfg.num_experts, N * K
  valid_A = jnp.repeat(valid_N, K)  # a = n * K + j
  key_A = jnp.where(valid_A, topi_NK.reshape(A), E)
  order_A = jnp.argsort(key_A, stable=True)
  group_sizes_E = jnp.sum(jax.nn.one_hot(key_A, E, dtype=jnp.int32), axis=0)
  x_AD = jnp.take(x_ND, order_A // K, axis=0)
  kp = {} if keeps is None else {n: m_NKI.reshape(A, -1)[order_A] for n, m_NKI in keeps.items()}
  pe = p_experts
  gate_AF = _ragged_linear(pe["gate_proj"], x_AD, group_sizes_E, kp.get("gate_proj"), cfg)
  up_AF = _ragged_linear(pe["up_proj"], x_AD, group_sizes_E, kp.get("up_proj"), cfg)
  out_AD = _ragged_linear(pe["down_proj"], jax.nn.silu(gate_AF) * up_AF, group_sizes_E,
                          kp.get("down_proj"), cfg)
  inv_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
  out_NKD = jnp.take(out_AD, inv_A, axis=0).reshape(N, K, -1)
  out_NKD = jnp.where(valid_N[:, None, None], out_NKD, 0)  # rows outside all groups are unspecified
  return jnp.einsum("nkd,nk->nd", out_NKD, combine_NK.astype(out_NKD.dtype),
                    preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- expert parallel

def _resolve_mesh(mesh):
  m = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if m is None or m.empty or EXPERT_AXIS not in m.axis_names:
    raise ValueError(f"moe_dispatch='expert_parallel' needs a mesh with an {EXPERT_AXIS!r} axis: pass "
                     f"mesh= or call inside `with jax.set_mesh(mesh)` (got {m})")
  return m


def _to_spec(x, spec, mesh, explicit: bool):
  """Explicit axes need inputs laid out as shard_map's in_specs; Auto axes reshard themselves."""
  if not explicit:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec)


def expert_parallel_ffn(p_experts, x_ND, topi_NK, combine_NK, valid_N, keeps, cfg: ModelConfig, mesh=None):
  """Capacity dispatch with experts sharded over the `expert` mesh axis (GShard all_to_all).

  Tokens are split over every mesh axis (each device routes its own slice);
  expert weights are split over `expert` and replicated over the other axes.
  Each device fills a local [E, C, D] buffer (C from its local token count),
  all_to_all sends expert block i to device i of the expert axis, the local
  experts run on [E/m, m*C, D], and the reverse all_to_all brings the outputs
  home. The token count is padded (with padding tokens) to a multiple of the
  device count. With capacity_factor <= 0 (dropless) the result equals the
  single-device layer; with drops, priority is decided per device.
  """
  mesh = _resolve_mesh(mesh)
  m = dict(zip(mesh.axis_names, mesh.axis_sizes))[EXPERT_AXIS]
  E, (N, K) = cfg.num_experts, topi_NK.shape
  if E % m:
    raise ValueError(f"num_experts={E} is not divisible by the {EXPERT_AXIS!r} mesh axis size {m}")
  explicit = any(t == AxisType.Explicit for t in mesh.axis_types)
  in_spec = jax.typeof(x_ND).sharding.spec if explicit else None
  tok_axes = tuple(mesh.axis_names)
  shards = math.prod(mesh.axis_sizes)
  pad = (-N) % shards
  if pad:
    x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
    topi_NK, combine_NK = jnp.pad(topi_NK, ((0, pad), (0, 0))), jnp.pad(combine_NK, ((0, pad), (0, 0)))
    valid_N = jnp.pad(valid_N, (0, pad))
    keeps = None if keeps is None else {n: jnp.pad(v, ((0, pad), (0, 0), (0, 0))) for n, v in keeps.items()}
  C = capacity((N + pad) // shards, E, K, cfg.capacity_factor)
  tok = P(tok_axes)
  exp = P(EXPERT_AXIS)
  p_specs = jax.tree.map(lambda _: exp, p_experts)
  k_specs = None if keeps is None else jax.tree.map(lambda _: tok, keeps)

  def local(pe, x_nD, topi_nK, comb_nK, valid_n, keeps_n):
    def run(x_ECD, keeps_ECI):
      send = lambda b: jax.lax.all_to_all(b, EXPERT_AXIS, 0, 1, tiled=True)  # [E, C, .] -> [E/m, m*C, .]
      kl = None if keeps_ECI is None else {n: send(v) for n, v in keeps_ECI.items()}
      out_eCD = expert_swiglu(pe, send(x_ECD), kl, cfg)
      return jax.lax.all_to_all(out_eCD, EXPERT_AXIS, 1, 0, tiled=True)  # back to [E, C, D]
    return capacity_ffn(pe, x_nD, topi_nK, comb_nK, valid_n, keeps_n, C, cfg, expert_fn=run)

  args = (p_experts, x_ND, topi_NK, combine_NK, valid_N, keeps)
  specs = (p_specs, tok, tok, tok, tok, k_specs)
  args = jax.tree.map(lambda s, a: _to_spec(a, s, mesh, explicit), specs, args,
                      is_leaf=lambda s: isinstance(s, P))
  y_ND, dropped_N = jax.shard_map(local, mesh=mesh if isinstance(mesh, jax.sharding.Mesh) else None,
                                  in_specs=specs, out_specs=(tok, tok))(*args)
  if explicit:  # hand the tokens back laid out as they came in
    out_spec = P(*in_spec) if not pad else P()
    y_ND = _to_spec(y_ND, P(*out_spec[:2]), mesh, True)
    dropped_N = _to_spec(dropped_N, P(*out_spec[:1]), mesh, True)
  return y_ND[:N], dropped_N[:N]


# ----------------------------------------------------------------------------- sparse

SPARSE_TILE = 128  # rows per expert GEMM once a call has more tokens than this


def split_experts(p_experts: dict) -> tuple:
  """E per-expert trees ([in, out] leaves). Under jit each is its own buffer, which XLA:CPU's
  matmul reads in place; a slice of the stacked [E, in, out] leaf is first copied."""
  E = p_experts["gate_proj"]["kernel"].shape[0]
  return tuple(jax.tree.map(lambda a: a[e], p_experts) for e in range(E))


def stack_experts(experts) -> dict:
  """Inverse of split_experts (stacked trees pass through)."""
  if not isinstance(experts, (tuple, list)):
    return experts
  return jax.tree.map(lambda *a: jnp.stack(a), *experts)


def _one_expert(p_experts, e: int) -> dict:
  if isinstance(p_experts, (tuple, list)):
    return p_experts[e]
  return jax.tree.map(lambda a: a[e], p_experts)  # inside the branch: only a chosen expert is copied


def _linears_2d(ps, x_MI, keeps_MI, cfg: ModelConfig) -> list:
  """[x @ kernel (+ LoRA) for each p] with 2-D operands: XLA:CPU runs these as GEMMs (its batched dots are
  far slower at decode sizes); packed weights that share x go to the CPU kernel in one call."""
  dt = cfg.compute_dtype
  x_MI = x_MI.astype(dt)
  outs = []
  for p, keep_MI, y_MO in zip(ps, keeps_MI, panels.matmuls(ps, x_MI, dt)):
    if "lora_a" in p:  # layers.lora_term: its backward forms lora_a's gradient the fast way round
      y_MO = y_MO + layers.lora_term(layers.lora_input(x_MI, keep_MI, cfg), p["lora_a"].astype(dt),
                                      p["lora_b"].astype(dt), cfg.lora_scale)
    outs.append(y_MO)
  return outs


def _swiglu_2d(pe: dict, x_MD, keeps_M: dict, cfg: ModelConfig):
  gate_MF, up_MF = _linears_2d((pe["gate_proj"], pe["up_proj"]), x_MD,
                               (keeps_M.get("gate_proj"), keeps_M.get("up_proj")), cfg)
  return _linears_2d((pe["down_proj"],), jax.nn.silu(gate_MF) * up_MF, (keeps_M.get("down_proj"),), cfg)[0]


def sparse_tiles(num_tokens: int, k: int, num_experts: int) -> tuple:
  """(rows per tile t, static tile count) of sparse_ffn.

  t = min(N, SPARSE_TILE). Expert e's n_e assignments take ceil(n_e / t) tiles;
  since n_e <= N (a token's top-k are distinct), sum n_e <= N k and at most min(E, N k) experts are
  chosen, at most min(E' ceil(N / t), floor((N k + E' (t - 1)) / t)) tiles are used, E' = min(E, N k): k tiles of
  one row at batch 1, at most E tiles of N rows while N <= SPARSE_TILE.
  """
  t = max(1, min(num_tokens, SPARSE_TILE))
  A = num_tokens * k
  E = min(num_experts, A)  # at most A experts are chosen at all; the others take no tile
  return t, max(1, min(E * -(-num_tokens // t), (A + E * (t - 1)) // t))


def sparse_ffn(p_experts, x_ND, topi_NK, combine_NK, valid_N, keeps, cfg: ModelConfig):
  """Dropless grouped GEMM that reads only the chosen experts' weights.

  The N*k assignments are sorted by expert and cut into tiles of t rows, each
  holding one expert's rows (zero-filled at its group's end); every tile runs
  `lax.switch` on its expert, so an expert nobody chose is never read, and an
  empty tile (past the last group) runs nothing. At batch 1 that is a GEMV on
  each of the k chosen experts; at decode batch B, one GEMM of B rows per
  expert in use; for long inputs, ~N k / t tiles. Padding tokens take no row.
  Returns y_ND (float32).
  """
  E = len(p_experts) if isinstance(p_experts, (tuple, list)) else p_experts["gate_proj"]["kernel"].shape[0]
  N, K = topi_NK.shape
  A, D = N * K, x_ND.shape[-1]
  t, n_tiles = sparse_tiles(N, K, E)
  valid_A = jnp.repeat(valid_N, K)  # a = n * K + j
  key_A = jnp.where(valid_A, topi_NK.reshape(A), E)
  order_A = jnp.argsort(key_A, stable=True).astype(jnp.int32)
  size_E = jnp.sum(jax.nn.one_hot(key_A, E, dtype=jnp.int32), axis=0)
  start_E = jnp.cumsum(size_E) - size_E  # first sorted row of each group
  tile_end_E = jnp.cumsum(-(-size_E // t))
  tile_I = jnp.arange(n_tiles, dtype=jnp.int32)
  e_I = jnp.searchsorted(tile_end_E, tile_I, side="right").astype(jnp.int32)  # E: empty tile
  ec_I = jnp.minimum(e_I, E - 1)
  first_I = (tile_I - (tile_end_E - (-(-size_E // t)))[ec_I]) * t  # row offset inside the group
  r_IT = first_I[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  ok_IT = (e_I[:, None] < E) & (r_IT < size_E[ec_I][:, None])
  a_IT = jnp.where(ok_IT, order_A[jnp.clip(start_E[ec_I][:, None] + r_IT, 0, A - 1)], A)
  x_ITD = jnp.take(x_ND, a_IT // K, axis=0, mode="fill", fill_value=0)
  keeps_IT = {} if keeps is None else {
      n: jnp.take(m_NKI.reshape(A, -1), a_IT, axis=0, mode="fill", fill_value=True) for n, m_NKI in keeps.items()}
  branches = [functools.partial(lambda e, x, kp: _swiglu_2d(_one_expert(p_experts, e), x, kp, cfg), e)
              for e in range(E)]
  branches.append(lambda x, kp: jnp.zeros((t, D), cfg.compute_dtype))

  def tile(args):
    e, x_TD, kp = args
    return jax.lax.switch(e, branches, x_TD, kp)

  if n_tiles <= 2 * E:  # decode sizes: unrolled, no loop
    out_ITD = jnp.stack([tile((e_I[i], x_ITD[i], {n: m[i] for n, m in keeps_IT.items()}))
                         for i in range(n_tiles)])
  else:
    out_ITD = jax.lax.map(tile, (e_I, x_ITD, keeps_IT))
  pos_A = jnp.zeros((A,), jnp.int32).at[a_IT.reshape(-1)].set(jnp.arange(n_tiles * t, dtype=jnp.int32),
                                                               mode="drop")
  out_NKD = jnp.take(out_ITD.reshape(n_tiles * t, D), pos_A, axis=0).reshape(N, K, D)
  out_NKD = jnp.where(valid_A.reshape(N, K, 1), out_NKD, 0)  # padding rows were never computed
  return jnp.einsum("nkd,nk->nd", out_NKD, combine_NK.astype(out_NKD.dtype),
                    preferred_element_type=jnp.float32)
