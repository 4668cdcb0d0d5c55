"""The pytree engine: maps a per-tensor merge function over params trees (or single arrays).

Every method is written once at the single-tensor level as

  array_fn(base_X | None, models_NX, key | None, **hp) -> merged_X   (float32 in, float32 out)

where X is one HF tensor's shape. `merge_tree` validates the inputs, folds LoRA
leaves into their kernels, resolves the path -> rule table and mergekit layer
gradients per leaf, vmaps the function over stacked axes (layers [L, ...],
experts [L, E, ...]) so that "per tensor" statistics stay per HF tensor, runs it
under `jax.jit` with the hyper-parameters static, and casts back to the base's
(else the first model's) dtype.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from h3jax.merging import rules as rules_lib
from h3jax.model.lora import merge_lora


# Keyword arguments every method takes besides its own knobs (see h3jax.merging.basic).
COMMON_KWARGS = ("rules", "lora_scale", "seed")


def pop_lambda(name: str, lambda_, kw: dict):
  """A method's global delta scale from `lambda_` or `**{"lambda": x}` (popped from kw); a ValueError
  names any keyword in kw that is neither that nor one of COMMON_KWARGS."""
  if "lambda" in kw:
    lambda_ = kw.pop("lambda")
  unknown = sorted(set(kw) - set(COMMON_KWARGS))
  if unknown:
    raise ValueError(f"{name}: unknown hyper-parameter(s) {unknown}")
  return lambda_


def common_kwargs(kw: dict) -> dict:
  """The COMMON_KWARGS in kw that `merge_tree` takes (rules, lora_scale; a seed is passed explicitly)."""
  return {k: kw[k] for k in COMMON_KWARGS if k in kw and k != "seed"}


def fold_lora(tree, lora_scale: float = 1.0):
  """Folds `lora_a`/`lora_b` next to a `kernel` into it: kernel + s * a @ b (`h3jax.model.lora.merge_lora`)."""
  return merge_lora(tree, lora_scale)


def leaves_with_paths(tree) -> list:
  """[(path_str, leaf)] in flatten order."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(rules_lib.path_str(p), x) for p, x in flat]


def nonfinite_leaves(tree) -> list:
  """[(path, n_nan, n_inf)] for the floating-point leaves of `tree` (or an array) holding NaN/inf.
  One reduction per leaf on its device; only the counts come to the host."""
  bad = []
  for path, x in leaves_with_paths(tree):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.size == 0:
      continue
    n_nan, n_inf = (int(v) for v in jax.device_get((jnp.sum(jnp.isnan(x)), jnp.sum(jnp.isinf(x)))))
    if n_nan or n_inf:
      bad.append((path or "<array>", n_nan, n_inf))
  return bad


class NonFiniteError(ValueError):
  """A params tree (a merge input or output, a model to evaluate) holds NaN/inf weights."""


def check_finite(tree, what: str):
  """Raises NonFiniteError naming `what` and its first non-finite leaves; returns `tree`."""
  bad = nonfinite_leaves(tree)
  if bad:
    shown = "; ".join(f"{p} ({n} NaN, {i} inf)" for p, n, i in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise NonFiniteError(f"{what}: {len(bad)} tensor(s) are not finite: {shown}{more}")
  return tree


def check_models(name: str, base, models, *, needs_base: bool, min_models: int = 1,
                 max_models: Optional[int] = None):
  """Validates the inputs of a method; returns the list of models."""
  if models is None or not isinstance(models, (list, tuple)):
    raise ValueError(f"{name}: `models` must be a list of params trees or arrays, "
                     f"got {type(models).__name__}")
  models = list(models)
  if needs_base and base is None:
    raise ValueError(f"{name} is base-relative and needs a base model (got base=None)")
  if len(models) < min_models:
    raise ValueError(f"{name} needs at least {min_models} model(s) besides the base, got {len(models)}")
  if max_models is not None and len(models) > max_models:
    raise ValueError(f"{name} takes at most {max_models} model(s) besides the base, got {len(models)}")
  ref = base if base is not None else models[0]
  ref_struct = jax.tree.structure(ref)
  ref_leaves = leaves_with_paths(ref)
  for i, m in enumerate(models):
    who = f"model {i}"
    if jax.tree.structure(m) != ref_struct:
      mine = {p for p, _ in leaves_with_paths(m)}
      theirs = {p for p, _ in ref_leaves}
      diff = sorted(mine ^ theirs)[:5]
      raise ValueError(f"{name}: {who} has a different architecture (param tree) than the "
                       f"{'base' if base is not None else 'first model'}; differing keys: {diff}")
    for (path, a), (_, b) in zip(ref_leaves, leaves_with_paths(m)):
      if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name}: shape mismatch at {path or '<array>'!r}: "
                         f"{tuple(a.shape)} vs {tuple(b.shape)} ({who})")
  return models


def check_density(name: str, densities, low_open: bool = True):
  for d in densities:
    for v in (d if isinstance(d, (list, tuple)) else (d,)):
      if not (0.0 < float(v) <= 1.0):
        raise ValueError(f"{name}: density must be in (0, 1], got {v}")


def path_key(seed, path: str):
  """A PRNG key for one tensor, independent of execution order."""
  if seed is None:
    return None
  key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _hashable(v):
  if isinstance(v, (list, tuple)):
    return tuple(_hashable(e) for e in v)
  if isinstance(v, Mapping):
    return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
  return v


@functools.partial(jax.jit, static_argnames=("fn", "hp", "batch_dims", "with_aux"))
def _apply(fn, base_X, models_NX, key, *, hp, batch_dims, with_aux=False):
  kw = dict(hp)
  base_X = None if base_X is None else base_X.astype(jnp.float32)
  models_NX = models_NX.astype(jnp.float32)

  def one(b, m, k):
    return fn(b, m, k, **kw)

  f = one
  for _ in range(batch_dims):
    f = jax.vmap(f, in_axes=(None if base_X is None else 0, 1, None if key is None else 0))
  if key is not None and batch_dims:
    batch_shape = models_NX.shape[1:1 + batch_dims]
    key = jax.random.split(key, math.prod(batch_shape)).reshape(batch_shape)
  out = f(base_X, models_NX, key)
  return out if with_aux else (out, None)


def merge_leaf(fn, base_X, models, path: str, hp: Mapping[str, Any], *, per_model_keys=(),
               seed=None, exclude_fn=None, with_aux=False, batch_dims=None):
  """Merges one tensor (possibly stacked) with rule-resolved `hp`; returns (out_f32, aux)."""
  hp = dict(hp)
  if hp.pop("keep_base", False):
    ref = base_X if base_X is not None else models[0]
    return jnp.asarray(ref, jnp.float32), None
  if hp.pop("exclude", False):
    if exclude_fn is None:
      ref = base_X if base_X is not None else models[0]
      return jnp.asarray(ref, jnp.float32), None
    fn, with_aux = exclude_fn, False
  ref = base_X if base_X is not None else models[0]
  if ref.size == 0:  # nothing to merge (e.g. an empty tensor in a raw safetensors file)
    return jnp.asarray(ref, jnp.float32), None
  bd = hp.pop("batch_dims", None)
  bd = batch_dims if bd is None else bd
  bd = rules_lib.default_batch_dims(path) if bd is None else bd
  ref = base_X if base_X is not None else models[0]
  bd = min(bd, ref.ndim)
  models_NX = jnp.stack([jnp.asarray(m) for m in models])
  key = path_key(seed, path)
  if rules_lib.has_gradient(hp, per_model_keys):
    if bd == 0:
      hp = rules_lib.at_layer(hp, per_model_keys, 0.0)
    else:
      L = ref.shape[0]
      outs, auxs = [], []
      for i in range(L):
        t = i / (L - 1) if L > 1 else 1.0
        hp_i = rules_lib.at_layer(hp, per_model_keys, t)
        k_i = None if key is None else jax.random.fold_in(key, i)
        o, a = _apply(fn, None if base_X is None else base_X[i], models_NX[:, i], k_i,
                      hp=_hashable(hp_i), batch_dims=bd - 1, with_aux=with_aux)
        outs.append(o)
        auxs.append(a)
      aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxs) if with_aux else None
      return jnp.stack(outs), aux
  if bd and key is None and jax.default_backend() == "cpu":
    # One layer at a time: vmapped over stacked layers, an SVD/eigh becomes a batched LAPACK call, which
    # jaxlib 0.10.2 runs on XLA:CPU's intra-op pool and blocks in until its chunks have run on that same
    # pool; with several such calls in flight (one per task / tensor) a 2-core machine deadlocked at 0 %
    # CPU (gdb: every pool thread in ParallelBatchMap; the SmolLM2 study's TSV-M merge). Every method
    # treats the stacked tensors independently, so the result is the same.
    outs = [_apply(fn, None if base_X is None else base_X[i], models_NX[:, i], None, hp=_hashable(hp),
                   batch_dims=bd - 1, with_aux=with_aux) for i in range(ref.shape[0])]
    aux = jax.tree.map(lambda *xs: jnp.stack(xs), *[a for _, a in outs]) if with_aux else None
    return jnp.stack([o for o, _ in outs]), aux
  return _apply(fn, base_X, models_NX, key, hp=_hashable(hp), batch_dims=bd, with_aux=with_aux)


def merge_tree(fn: Callable, base, models: Sequence, *, name: str, hparams: Mapping[str, Any],
               per_model_keys: Sequence[str] = (), rules=None, needs_base: bool = True,
               min_models: int = 1, max_models: Optional[int] = None, seed=None,
               exclude_fn: Optional[Callable] = None, lora_scale: float = 1.0,
               with_aux: bool = False, extra_leaf_hp: Optional[Callable] = None):
  """Applies `fn` leaf by leaf; returns the merged tree (and {path: aux} if with_aux)."""
  if isinstance(models, (list, tuple)):
    models = [fold_lora(m, lora_scale) for m in models]
  if base is not None:
    base = fold_lora(base, lora_scale)
  models = check_models(name, base, models, needs_base=needs_base, min_models=min_models,
                        max_models=max_models)
  table = rules_lib.validate_rules(rules)
  n = len(models)
  hp0 = dict(hparams)
  for k in per_model_keys:
    if k in hp0:
      hp0[k] = rules_lib.per_model(k, hp0[k], n)
  ref = base if base is not None else models[0]
  ref_leaves = leaves_with_paths(ref)
  model_leaves = [[x for _, x in leaves_with_paths(m)] for m in models]
  outs, auxs = [], {}
  for j, (path, ref_X) in enumerate(ref_leaves):
    hp = rules_lib.resolve(path, table, hp0)
    for k in per_model_keys:
      if k in hp:
        hp[k] = rules_lib.per_model(k, hp[k], n)
    if extra_leaf_hp is not None:
      hp.update(extra_leaf_hp(path, j))
    base_X = None if base is None else ref_X
    out, aux = merge_leaf(fn, base_X, [ml[j] for ml in model_leaves], path, hp,
                          per_model_keys=per_model_keys, seed=seed, exclude_fn=exclude_fn,
                          with_aux=with_aux)
    outs.append(out.astype(jnp.asarray(ref_X).dtype))
    if with_aux and aux is not None:
      auxs[path] = aux
  merged = jax.tree.unflatten(jax.tree.structure(ref), outs)
  return (merged, auxs) if with_aux else merged
