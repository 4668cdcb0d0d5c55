"""The other mergekit 0.1.5 methods: NearSwap, SCE, Passthrough, Arcee Fusion, RAM / RAM+ (TL).

Each public method is `method(base, models, **hparams)` over params trees or single
arrays (common keywords `rules`, `lora_scale`: h3jax.merging.basic); hyper-parameter
names and defaults are mergekit 0.1.5's, and so are the formulas (read from its
`merge_methods/{nearswap,sce,passthrough,arcee_fusion,ram}.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.merging import blocks
from h3jax.merging import select
from h3jax.merging import tree as tree_lib
from h3jax.merging.tree import common_kwargs
from h3jax.merging.spherical import check_kwargs


def _one_value(name, key, value):
  """A shared hyper-parameter that an h3jax .py config hands over once per model (a tuple; a list
  is a layer gradient)."""
  if isinstance(value, tuple):
    if len(set(value)) != 1:
      raise ValueError(f"{name}: {key} is one value for all models, got {value!r}")
    return value[0]
  return value


def _num(v):
  """A float, or a layer gradient (a list) left for the engine to resolve per layer."""
  return v if isinstance(v, list) else float(v)


# ----------------------------------------------------------------------------- NearSwap

def _nearswap_array(base_X, models_NX, key, *, t):
  b_X = models_NX[0]
  w_X = jnp.clip(t / jnp.maximum(jnp.abs(base_X - b_X), 1e-6), 0.0, 1.0)
  return w_X * b_X + (1 - w_X) * base_X


def nearswap(base, models, *, t=None, **kw):
  """NearSwap: take the model's value where it is within ~t of the base's, interpolating with
  weight clip(t / |base - model|, 0, 1) elsewhere. Exactly one model besides the base; `t`
  required (may be a layer gradient)."""
  check_kwargs("nearswap", kw)
  if t is None:
    raise ValueError("nearswap needs the distance threshold t")
  return tree_lib.merge_tree(_nearswap_array, base, models, name="nearswap", hparams=dict(t=t),
                             min_models=1, max_models=1, **common_kwargs(kw))


# ----------------------------------------------------------------------------- SCE

def _sce_k(nnz, select_topk):
  """mergekit: k = int(nnz * select_topk), a float32 product (torch promotes int64 x float)."""
  return int(np.float32(nnz) * np.float32(select_topk))


def _sce_mask_host(var_X, select_topk):
  """CPU: k and the k-th largest variance found in numpy (XLA:CPU's sort is ~10x slower)."""
  def cut(v):
    v_n = np.asarray(v, np.float32).reshape(-1)
    k = _sce_k(np.count_nonzero(v_n), select_topk)
    if k == 0:
      return np.float32(np.inf), np.int32(-1)
    thr, cutoff = select.np_topk_cut(np.abs(v_n).view(np.uint32), k)
    return np.array(thr, np.uint32).view(np.float32), np.int32(cutoff)
  out = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
  thr, cutoff = jax.pure_callback(cut, out, var_X, vmap_method="sequential")
  return select.mask_from_cut(var_X, thr, cutoff)


def _sce_mask_sorted(var_X, select_topk):
  """Accelerators: a stable sort (ties at the k-th variance by flat index, as on the host)."""
  nnz = jnp.count_nonzero(var_X)
  k = jnp.floor(nnz.astype(jnp.float32) * jnp.float32(select_topk)).astype(jnp.int32)
  order = jnp.argsort(-jnp.abs(var_X).reshape(-1), stable=True)  # largest variance first
  rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return (rank < k).reshape(var_X.shape)


def sce_mask(tv_NX, select_topk: float):
  """Keep the top `select_topk` fraction (of the non-zero variances) of entries by the variance of
  the task vectors across models; k = floor(nnz * select_topk) in float32 as mergekit computes it."""
  if select_topk <= 0:
    return jnp.zeros(tv_NX.shape[1:], bool)
  if select_topk >= 1:
    return jnp.ones(tv_NX.shape[1:], bool)
  var_X = jnp.var(tv_NX, axis=0)
  return jax.lax.platform_dependent(var_X, cpu=lambda v: _sce_mask_host(v, select_topk),
                                    default=lambda v: _sce_mask_sorted(v, select_topk))


def _sce_array(base_X, models_NX, key, *, select_topk=1.0):
  n = models_NX.shape[0]
  tv_NX = blocks.task_vectors(base_X, models_NX)
  if select_topk < 1:
    tv_NX = tv_NX * sce_mask(tv_NX, select_topk)[None]
  erase_NX = jnp.sign(tv_NX) == blocks.elect_sign(tv_NX, "mergekit")[None]
  w_N = jnp.mean(jnp.square(tv_NX).reshape(n, -1), axis=1)  # per-model mean squared delta
  w_sum = jnp.sum(w_N)
  w_N = jnp.where(jnp.abs(w_sum) < 1e-6, 1.0 / n, w_N / jnp.where(jnp.abs(w_sum) < 1e-6, 1.0, w_sum))
  ew_NX = w_N.reshape((n,) + (1,) * (tv_NX.ndim - 1)) * erase_NX
  merged_X = blocks.sum_models(tv_NX * ew_NX) / jnp.maximum(blocks.sum_models(ew_NX), 1e-6)
  return base_X + merged_X


def sce(base, models, *, select_topk=1.0, int8_mask=False, **kw):
  """SCE (arXiv 2408.07990): Select the top `select_topk` entries by variance across the task
  vectors, Calculate per-model weights from their mean squared delta, Erase entries against the
  (sum) majority sign, then the weighted disjoint mean. int8_mask: mergekit's mask dtype only
  (numerically identical; accepted and ignored)."""
  del int8_mask
  check_kwargs("sce", kw)
  return tree_lib.merge_tree(_sce_array, base, models, name="sce",
                             hparams=dict(select_topk=_num(select_topk)), **common_kwargs(kw))


# ----------------------------------------------------------------------------- Passthrough

def _passthrough_array(base_X, models_NX, key, *, scale=None):
  return models_NX[0] if scale is None else models_NX[0] * scale


def passthrough(base, models, *, scale=None, **kw):
  """Passthrough: a copy of the single input model, optionally times `scale` (a number or a layer
  gradient / rule). `base` must be None (mergekit: at most one input)."""
  check_kwargs("passthrough", kw)
  if base is not None:
    raise ValueError("passthrough takes exactly one model and no base model")
  scale = _one_value("passthrough", "scale", scale)
  hp = {} if scale is None else {"scale": scale}
  return tree_lib.merge_tree(_passthrough_array, None, models, name="passthrough", hparams=hp,
                             needs_base=False, min_models=1, max_models=1, **common_kwargs(kw))


# ----------------------------------------------------------------------------- Arcee Fusion

def _quantile_index(q: float, n: int) -> int:
  """mergekit's approximate quantile position: floor(float32(q) * (n - 1)) of the sorted values."""
  return int(np.float32(q) * np.float32(n - 1))


def _quantiles_host(x_n, idx):
  """CPU: order statistics by numpy's partition (O(n); XLA:CPU sorts ~10x slower)."""
  def part(a):
    return np.partition(np.asarray(a, np.float32), idx)[list(idx)].astype(np.float32)
  return jax.pure_callback(part, jax.ShapeDtypeStruct((len(idx),), jnp.float32), x_n,
                           vmap_method="sequential")


def _quantiles_sorted(x_n, idx):
  s_n = jnp.sort(x_n)
  return jnp.stack([s_n[i] for i in idx])


def _arcee_fusion_array(base_X, models_NX, key, *, axis=-1):
  m_X = models_NX[0]
  p = jax.nn.softmax(m_X, axis=axis) + 1e-8
  q = jax.nn.softmax(base_X, axis=axis) + 1e-8
  kl = jnp.sum(p * jnp.log(p / q), axis=axis, keepdims=True)
  imp_X = jnp.abs(m_X - base_X) * kl  # importance: |delta| x KL of the softmaxed rows
  idx = tuple(_quantile_index(f, imp_X.size) for f in (0.25, 0.5, 0.75))
  q_3 = jax.lax.platform_dependent(imp_X.reshape(-1), cpu=lambda x: _quantiles_host(x, idx),
                                   default=lambda x: _quantiles_sorted(x, idx))
  q1, med, q3 = q_3[0], q_3[1], q_3[2]
  keep_X = imp_X >= med + 1.5 * (q3 - q1)
  return base_X + (m_X - base_X) * keep_X.astype(jnp.float32)


def _softmax_axis_hp(path, j):
  """mergekit's softmax runs along HF dim -1 (the input axis): axis 0 of an h3jax kernel."""
  return {"axis": 0 if path.endswith("kernel") else -1}


def arcee_fusion(base, models, **kw):
  """Arcee Fusion: keep the model's change only where its importance |delta| * KL(softmax(model)
  || softmax(base)) (KL per row) is at least median + 1.5 IQR of the tensor's importances. Exactly
  one model besides the base. Quantiles are exact (mergekit samples 1e6 entries at random from
  tensors larger than that, so it is not reproducible there)."""
  check_kwargs("arcee_fusion", kw)
  return tree_lib.merge_tree(_arcee_fusion_array, base, models, name="arcee_fusion", hparams={},
                             min_models=1, max_models=1, extra_leaf_hp=_softmax_axis_hp,
                             **common_kwargs(kw))


# ----------------------------------------------------------------------------- RAM / RAM+ (TL)

def _ram_array(base_X, models_NX, key, *, epsilon=1e-5, r=None, alpha=None):
  n = models_NX.shape[0]
  tv_NX = blocks.task_vectors(base_X, models_NX)
  nz_NX = jnp.abs(tv_NX) > epsilon
  count_X = blocks.sum_models(nz_NX.astype(jnp.int32))
  overlap_X, unique_X = count_X > 1, count_X == 1
  tvz_NX = tv_NX * nz_NX
  scale_N1 = jnp.ones((n, 1), jnp.float32)
  if r is not None:  # RAM+ (tensor-local): boost models whose changes are mostly shared
    flat_nz = nz_NX.reshape(n, -1)
    shared_N = jnp.sum(flat_nz & overlap_X.reshape(1, -1), axis=1).astype(jnp.float32)
    uniq_N = jnp.sum(flat_nz & unique_X.reshape(1, -1), axis=1).astype(jnp.float32)
    rho_N = shared_N / jnp.maximum(uniq_N, epsilon)
    scale_N1 = (1 + r * jnp.clip(rho_N, 0, alpha))[:, None]
  scale_NX = scale_N1.reshape((n,) + (1,) * (tv_NX.ndim - 1))
  per_NX = tvz_NX * unique_X[None] * scale_NX + tvz_NX * overlap_X[None] / jnp.maximum(count_X, 1)[None]
  return base_X + blocks.sum_models(per_NX)


def ram(base, models, *, epsilon=1e-5, **kw):
  """RAM (arXiv 2601.13572): task-vector entries with |tau| > epsilon; where one model changed an
  entry its change is kept, where several did they are averaged."""
  check_kwargs("ram", kw)
  return tree_lib.merge_tree(_ram_array, base, models, name="ram",
                             hparams=dict(epsilon=_num(_one_value("ram", "epsilon", epsilon))),
                             **common_kwargs(kw))


def ramplus_tl(base, models, *, r=0.1, alpha=0.2, epsilon=1e-5, **kw):
  """RAM+ (tensor-local): RAM with each model's unique changes scaled by 1 + r clip(rho, 0, alpha),
  rho = (its shared changed entries) / (its unique changed entries), per tensor."""
  check_kwargs("ramplus_tl", kw)
  return tree_lib.merge_tree(_ram_array, base, models, name="ramplus_tl",
                             hparams=dict(epsilon=_num(_one_value("ramplus_tl", "epsilon", epsilon)),
                                          r=_num(r), alpha=_num(alpha)), **common_kwargs(kw))
