"""Spherical merges of mergekit 0.1.5: NuSLERP, Multi-SLERP and the Karcher mean.

Each public method is `method(base, models, **hparams)` over params trees or single
arrays (see h3jax.merging.basic for the common keywords `rules`, `lora_scale`);
hyper-parameter names and defaults are mergekit 0.1.5's. `base` is optional for all
three: with a base, NuSLERP and Multi-SLERP interpolate task vectors and add the base
back; the Karcher mean averages the base together with the models (mergekit adds
`base_model` to the inputs of a base-ignoring method).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from h3jax.merging import blocks
from h3jax.merging import tree as tree_lib
from h3jax.merging.tree import common_kwargs, pop_lambda


def check_kwargs(name, kw):
  """Only the common keywords; `lambda` is refused (it would be silently meaningless here)."""
  if "lambda" in kw:
    raise ValueError(f"{name}: unknown hyper-parameter(s) ['lambda'] ({name} has no task-vector scale)")
  pop_lambda(name, 1.0, dict(kw))


def _needs_weight(name, weight):
  if weight is None:
    raise ValueError(f"{name} needs a per-model `weight` (mergekit has no default)")


def _row_axis_hp(row_wise: bool):
  """Axis of the vectors NuSLERP normalises, per leaf. mergekit uses dim 0 (row_wise) or -1 of HF
  [out, in] weights; an h3jax `kernel` is [in, out], so those are its axes -1 and 0."""
  def leaf_hp(path, j):
    if path.endswith("kernel"):
      return {"axis": -1 if row_wise else 0}
    return {"axis": 0 if row_wise else -1}
  return leaf_hp


# ----------------------------------------------------------------------------- NuSLERP

def slerp_along(t: float, v0_X, v1_X, *, axis: int = -1, flatten: bool = False, eps: float = 1e-8):
  """mergekit 0.1.5 `nuslerp`: slerp of v0 -> v1 at t, one angle per vector along `axis` (one per
  tensor if `flatten`). Colinear vectors (1 - cos^2 <= eps^2) are interpolated linearly; the
  endpoints keep their own norms (no renormalisation)."""
  shape = v0_X.shape
  if flatten:
    v0, v1 = v0_X.reshape(-1), v1_X.reshape(-1)  # [X]
  else:
    v0, v1 = jnp.moveaxis(v0_X, axis, -1), jnp.moveaxis(v1_X, axis, -1)  # [..., R]

  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

  cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1, 1)  # [..., 1]
  colinear = (1 - jnp.square(cos)) <= eps ** 2
  theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
  sin_theta = jnp.where(colinear, 1.0, jnp.sin(theta))  # keeps the unused branch finite
  sph = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / sin_theta
  out = jnp.where(colinear, (1 - t) * v0 + t * v1, sph)
  if not flatten:
    out = jnp.moveaxis(out, -1, axis)
  return out.reshape(shape)


def nuslerp_t(weight) -> float:
  """mergekit: t = w_2 / (w_1 + w_2), 0.5 when the weights sum to ~0 (Python float maths)."""
  total = sum(float(w) for w in weight)
  return 0.5 if abs(total) < 1e-6 else float(weight[1]) / total


def _nuslerp_array(base_X, models_NX, key, *, weight, nuslerp_row_wise, nuslerp_flatten, axis=-1):
  del nuslerp_row_wise  # already turned into `axis` per leaf
  t = nuslerp_t(weight)
  if base_X is None:
    return slerp_along(t, models_NX[0], models_NX[1], axis=axis, flatten=nuslerp_flatten)
  return base_X + slerp_along(t, models_NX[0] - base_X, models_NX[1] - base_X, axis=axis,
                              flatten=nuslerp_flatten)


def nuslerp(base, models, *, weight=None, nuslerp_row_wise=False, nuslerp_flatten=True, **kw):
  """NuSLERP: slerp between exactly two models at t = w_2 / (w_1 + w_2); with a base, between their
  task vectors (base + slerp(tau_1, tau_2)). nuslerp_flatten: one angle per tensor (default);
  otherwise one per row, along HF dim 0 if nuslerp_row_wise else dim -1 (h3jax kernels: the
  transposed axes). `weight` is required (per model; may be a layer gradient)."""
  check_kwargs("nuslerp", kw)
  _needs_weight("nuslerp", weight)
  return tree_lib.merge_tree(_nuslerp_array, base, models, name="nuslerp",
                             hparams=dict(weight=weight, nuslerp_row_wise=bool(nuslerp_row_wise),
                                          nuslerp_flatten=bool(nuslerp_flatten)),
                             per_model_keys=("weight",), needs_base=False, min_models=2,
                             max_models=2, extra_leaf_hp=_row_axis_hp(bool(nuslerp_row_wise)),
                             **common_kwargs(kw))


# ----------------------------------------------------------------------------- Multi-SLERP

def _add_all(xs):
  """x_0 + x_1 + ... in order (a sequential sum, as torch's over a short model list)."""
  return functools.reduce(jnp.add, xs)


def _multislerp_array(base_X, models_NX, key, *, weight, normalize_weights=True, eps=1e-8):
  n = models_NX.shape[0]
  if n == 1:  # mergekit returns the model itself, base or not
    return models_NX[0]
  shape = models_NX.shape[1:]
  tv_NX = models_NX if base_X is None else blocks.task_vectors(base_X, models_NX)
  # Per-model 1-D pieces with scalar norms and dots: XLA:CPU runs a [N, 1]-shaped reduction
  # broadcast back over [N, M] ~100x slower than these scalar broadcasts.
  xs = [tv_NX[i].reshape(-1) for i in range(n)]  # N x [M]
  w_N = jnp.asarray(weight, jnp.float32)
  if normalize_weights:
    w_N = w_N / jnp.sum(w_N)
  norms = [jnp.linalg.norm(x) for x in xs]
  units = [x / (nrm + eps) for x, nrm in zip(xs, norms)]
  mean_M = _add_all([u * w_N[i] for i, u in enumerate(units)])
  mean_norm = jnp.linalg.norm(mean_M)
  degenerate = mean_norm < eps
  mean_M = mean_M / jnp.where(degenerate, 1.0, mean_norm)
  # Tangent space at the mean, weighted average there, exponential map back to the sphere.
  dots = [jnp.sum(u * mean_M) for u in units]
  tangent_M = _add_all([(u - d * mean_M) * w_N[i] for i, (u, d) in enumerate(zip(units, dots))])
  tn = jnp.linalg.norm(tangent_M) + eps
  out_M = mean_M * jnp.cos(tn) + tangent_M * (jnp.sin(tn) / tn)
  out_M = out_M * _add_all([nrm * w_N[i] for i, nrm in enumerate(norms)])
  if n == 2:  # mergekit falls back to a weighted sum for two antipodal task vectors
    out_M = jnp.where(degenerate, (tv_NX[0] * w_N[0] + tv_NX[1] * w_N[1]).reshape(-1), out_M)
  else:  # mergekit raises; a traced kernel cannot, so it marks the tensor (see multislerp)
    out_M = jnp.where(degenerate, jnp.nan, out_M)
  out_X = out_M.reshape(shape)
  return out_X if base_X is None else out_X + base_X


def multislerp(base, models, *, weight=None, normalize_weights=True, eps=1e-8, **kw):
  """Multi-SLERP: barycentric interpolation on the hypersphere (project the unit (task) vectors to
  the tangent space at their weighted mean, average there, map back, rescale by the weighted mean
  norm), one per tensor; with a base, of the task vectors. `weight` is required (per model).
  More than two task vectors whose weighted unit mean is ~0 have no answer: mergekit raises, and
  so does this function when called eagerly (under jit / in the file driver such a tensor is NaN)."""
  check_kwargs("multislerp", kw)
  _needs_weight("multislerp", weight)
  out = tree_lib.merge_tree(_multislerp_array, base, models, name="multislerp",
                            hparams=dict(weight=weight, normalize_weights=bool(normalize_weights),
                                         eps=float(eps)),
                            per_model_keys=("weight",), needs_base=False, **common_kwargs(kw))
  for path, x in tree_lib.leaves_with_paths(out):
    if not isinstance(x, jax.core.Tracer) and bool(jnp.isnan(x).any()):
      raise ValueError(f"multislerp: the weighted sum of the unit task vectors at {path or '<array>'!r} "
                       f"is zero (antipodal vectors with balancing weights); use different weights")
  return out


# ----------------------------------------------------------------------------- Karcher mean

def _karcher_array(base_X, models_NX, key, *, max_iter=10, tol=1e-5):
  xs_NX = models_NX if base_X is None else jnp.concatenate([models_NX, base_X[None]])
  n = xs_NX.shape[0]
  if n == 1:
    return xs_NX[0]
  shape = xs_NX.shape[1:]
  flat_NM = xs_NX.reshape(n, -1)
  norms_N = jnp.linalg.norm(flat_NM, axis=-1)
  unit_NM = jnp.where(norms_N[:, None] == 0, 0.0,
                      flat_NM / jnp.where(norms_N == 0, 1.0, norms_N)[:, None])
  valid_N = norms_N > tol
  any_valid = jnp.any(valid_N)
  alpha_N = jnp.where(valid_N, 1.0 / n, 0.0)
  alpha_N = alpha_N / jnp.where(any_valid, jnp.sum(alpha_N), 1.0)  # renormalised over valid inputs
  mean_M = blocks.sum_models(unit_NM * alpha_N[:, None])
  mean_norm = jnp.linalg.norm(mean_M)
  first_valid_M = unit_NM[jnp.argmax(valid_N)]
  mean_M = jnp.where(mean_norm < tol, first_valid_M, mean_M / jnp.where(mean_norm < tol, 1.0, mean_norm))

  def cond(state):
    i, _, done = state
    return (i < max_iter) & ~done

  def body(state):
    i, mean_M, _ = state
    dots_N = jnp.clip(unit_NM @ mean_M, -1.0, 1.0)
    theta_N = jnp.arccos(dots_N)
    use_N = valid_N & (theta_N >= tol)  # mergekit skips inputs already at the mean
    coef_N = jnp.where(use_N, alpha_N * (theta_N / jnp.where(use_N, jnp.sin(theta_N), 1.0)), 0.0)
    tangent_M = blocks.sum_models(coef_N[:, None] * (unit_NM - dots_N[:, None] * mean_M))
    tn = jnp.linalg.norm(tangent_M)
    stop = tn < tol
    new_M = jnp.cos(tn) * mean_M + jnp.sin(tn) * (tangent_M / jnp.where(stop, 1.0, tn))
    un = jnp.linalg.norm(new_M)
    new_M = jnp.where(un > tol, new_M / jnp.where(un > tol, un, 1.0), new_M)
    return i + 1, jnp.where(stop, mean_M, new_M), stop

  _, mean_M, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), mean_M, jnp.bool_(False)))
  scale = jnp.sum(norms_N * (1.0 / n))  # all inputs' norms, invalid ones included (mergekit)
  return jnp.where(any_valid, scale * mean_M, 0.0).reshape(shape)


def karcher(base, models, *, max_iter=10, tol=1e-5, **kw):
  """Karcher (Riemannian) mean on the unit hypersphere of the flattened tensors, equal weights,
  rescaled by the mean norm; at most `max_iter` gradient steps, stopping when the tangent norm
  falls below `tol` (a `lax.while_loop`; both static). Inputs with norm <= tol are left out of the
  direction. A given `base` is averaged as one more input (as mergekit does)."""
  check_kwargs("karcher", kw)
  if int(max_iter) != max_iter or max_iter < 0:
    raise ValueError(f"karcher: max_iter must be a non-negative integer, got {max_iter!r}")
  return tree_lib.merge_tree(_karcher_array, base, models, name="karcher",
                             hparams=dict(max_iter=int(max_iter), tol=float(tol)),
                             needs_base=False, **common_kwargs(kw))
