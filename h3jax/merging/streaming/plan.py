"""The streaming driver's plan: per-tensor keyword arguments and checks, written dtypes, memory budget.

Everything here runs before the first byte is written, so a bad parameter, range or weight sum is an
error naming the tensor (`MergeError`) while nothing exists yet.
"""

from __future__ import annotations

import inspect
from typing import Dict

import ml_dtypes
import numpy as np

from h3jax.merging.streaming import spec as spec_lib
from h3jax.merging.streaming.inputs import DTYPES, MergeError, layer_position
from h3jax.merging.streaming.settings import resolve_tensor_params
from h3jax.merging.streaming.spec import MergeSpec

# Host memory of one tensor's merge, in units of (inputs + 1) float32 copies of it: the inputs, the
# output, and what the kernel and the loader add (a numpy read while it is copied to jax; TIES's host
# top-k deltas; DARE's random bits and rescaling sums). Measured as the peak anonymous RSS growth of a
# merge of one 128 MiB tensor with 4 inputs (README "Merging"; tests/test_merge_driver.py checks it per
# method at 48 MiB); methods not measured are assumed to need twice the inputs. The scheduler admits
# tensors by this cost.
# Measured (this CPU, 4 inputs of 128 MiB; budgeted): linear 782 (1152), TIES 1174 (1408), DARE-TIES
# 1985 (2240) MiB; the AMD host measured 888 / 1155 / 1926. Linear is budgeted at 8 copies
# plus one: a CI host's XLA materialized the stacked models (4 inputs + 3 stacked + output; measured
# 383.8 MiB for 4 x 48 MiB), where this CPU's fused the sum (7 copies).
MEMORY_FACTOR = {"linear": 1.8, "task_arithmetic": 1.8, "ties": 2.2, "dare_ties": 3.5}
DEFAULT_MEMORY_FACTOR = 2.0


def tensor_memory_bytes(method: str, n_inputs: int, shape) -> int:
  """Host bytes the driver budgets for merging one tensor of `shape` (see MEMORY_FACTOR)."""
  factor = MEMORY_FACTOR.get(method, DEFAULT_MEMORY_FACTOR)
  return int(factor * (n_inputs + 1) * f32_bytes(shape))


def method_info(name: str):
  """(callable, accepted keyword names or None, takes a PRNG key)."""
  from h3jax import merging
  fn = merging.get_method(name)
  accepted = spec_lib.accepted_kwargs(fn)
  return fn, accepted, accepted is not None and "seed" in accepted


def kwargs_for(spec: MergeSpec, name: str, t: float, accepted) -> Dict:
  shared, per_model = resolve_tensor_params(spec, name, t, spec_lib.method_defaults(spec))
  kwargs = spec_lib.h3jax_kwargs(shared, per_model, spec)
  if spec.flavour == "mergekit" and accepted is not None:
    defaults, model_defaults = spec_lib.MERGEKIT_METHODS[spec.method]
    for key in list(kwargs):
      if key not in accepted and key.rstrip("_") not in accepted:
        mk = "lambda" if key == "lambda_" else key
        if mk in defaults and kwargs[key] == defaults[mk] or \
            mk in model_defaults and all(v == model_defaults[mk] for v in kwargs[key]):
          del kwargs[key]  # mergekit's default, which is h3jax's behaviour too
        else:
          raise MergeError(f"{spec.method}: mergekit parameter {mk}={kwargs[key]!r} is not supported by h3jax")
  for d in np.ravel(np.asarray(kwargs.get("density", ()), dtype=object)):
    if d is not None and not (isinstance(d, (int, float)) and 0 < d <= 1):
      raise MergeError(f"density must be in (0, 1], got {d!r} for {name}")
  _check_weight_sum(spec.method, kwargs, len(spec.models), name)
  return kwargs


# Methods that divide by sum(weight) when normalizing, and their `normalize` default.
_NORMALIZING = {"linear": True, "task_arithmetic": False}


def _check_weight_sum(method: str, kwargs: dict, n_models: int, name: str) -> None:
  """A normalized linear / task-arithmetic merge whose weights sum to zero divides by zero
  (linear: every output value is +-inf or NaN); refuse it while planning."""
  if method not in _NORMALIZING or not kwargs.get("normalize", _NORMALIZING[method]):
    return
  w = kwargs.get("weight", 1.0)
  total = float(np.sum(np.asarray(w, np.float64))) * (n_models if np.ndim(w) == 0 else 1)
  if abs(total) < 1e-8:
    raise MergeError(f"{method} with normalize: the weights {list(np.ravel(w))} of {name!r} sum to "
                     f"{total:g}, so the normalized merge divides by zero; use weights with a non-zero sum "
                     f"or normalize: false")


def _per_model(kwargs: Dict, key: str, fn, n: int) -> list:
  """kwargs[key] (or fn's default) as one value per model."""
  param = inspect.signature(fn).parameters.get(key)
  v = kwargs.get(key, None if param is None else param.default)
  return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _check_ranges(method: str, fn, kwargs: Dict, n_models: int, name: str):
  """Knob ranges the kernels would only reject mid-merge (after bytes were written)."""
  if method in ("breadcrumbs", "breadcrumbs_ties"):
    for g in _per_model(kwargs, "gamma", fn, n_models):
      if not (isinstance(g, (int, float)) and 0 <= g < 1):
        raise MergeError(f"{method}: gamma (the fraction of largest task-vector entries dropped) must be "
                         f"in [0, 1), got {g!r} for {name}")
  if method in ("della", "della_linear"):
    for d, e in zip(_per_model(kwargs, "density", fn, n_models), _per_model(kwargs, "epsilon", fn, n_models)):
      if not (isinstance(e, (int, float)) and e >= 0 and 0 < d - e and d + e < 1):
        raise MergeError(f"{method}: epsilon must be >= 0 with density +/- epsilon in (0, 1) (keep "
                         f"probabilities), got density={d}, epsilon={e} for {name}")


def resolve_plan(spec: MergeSpec, names, ref, num_layers: int, n_models: int) -> list:
  """[(tensor name, action, keyword arguments)] for every tensor, each checked: a bad parameter fails
  here, before anything is written. action: "merge" | "base" (copied: a rule, or an integer buffer) |
  "skip"; `ref` is the input whose dtypes and shapes the plan reads."""
  fn, accepted, _ = method_info(spec.method)
  plan = []
  for name in names:
    rule = spec.rule_for(name)
    action = rule.action if rule is not None else "merge"
    if action == "merge" and not np.issubdtype(ref.dtype(name), np.floating) \
        and ref.dtype(name) != ml_dtypes.bfloat16:
      action = "base"  # integer buffers are copied
    kwargs = kwargs_for(spec, name, layer_position(name, num_layers), accepted) if action == "merge" else {}
    if action == "merge":
      _check_ranges(spec.method, fn, kwargs, n_models, name)
    if action == "merge" and spec.method == "model_stock" and accepted and "in_axis" in accepted \
        and "in_axis" not in kwargs:
      kwargs["in_axis"] = max(len(ref.shape(name)) - 1, 0)  # mergekit: filters along the last axis
    plan.append((name, action, kwargs))
  return plan


def f32_bytes(shape) -> int:
  return 4 * int(np.prod(shape, dtype=np.int64))


# mergekit 0.1.5 methods whose kernels promote a half-precision input to float32 (a float32
# mask or ratio enters the arithmetic: arcee_fusion's `fusion_mask.float()`, ramplus_tl's rho);
# mergekit writes the kernel's dtype when out_dtype is unset.
MERGEKIT_FLOAT32_RESULT = ("arcee_fusion", "ramplus_tl")


def out_dtype(spec: MergeSpec, src_dtype, action: str = "merge", in_dtypes=()) -> np.dtype:
  """The written dtype: out_dtype, else (mergekit YAML) what mergekit 0.1.5 writes: its kernel's
  result dtype for inputs cast to `dtype` or, unset, promoted to a common dtype (mixed half
  dtypes -> float32); else (h3jax) dtype, else the base's (or first model's) dtype."""
  if spec.out_dtype is not None:
    return np.dtype(DTYPES[spec.out_dtype])
  if spec.flavour == "mergekit" and action == "merge":
    if spec.dtype is not None:
      dt = np.dtype(DTYPES[spec.dtype])
    else:
      dts = {np.dtype(d) for d in in_dtypes} or {np.dtype(src_dtype)}
      dt = dts.pop() if len(dts) == 1 else np.dtype(np.float32)
    if spec.method in MERGEKIT_FLOAT32_RESULT and dt.itemsize < 4:
      dt = np.dtype(np.float32)
    return dt
  if spec.dtype is not None:
    return np.dtype(DTYPES[spec.dtype])
  return np.dtype(src_dtype)
