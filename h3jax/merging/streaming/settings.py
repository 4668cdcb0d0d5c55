"""mergekit 0.1.5 parameter-setting syntax, resolved per tensor (scalars, gradients, filters).

See `h3jax.merging.streaming.config` for the configuration files these settings come from.
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple

REQUIRED = object()  # a parameter without a default


class MergeConfigError(ValueError):
  """A merge configuration that cannot be run; the message says which key and why."""


def is_scalar(x) -> bool:
  return isinstance(x, (bool, int, float, str))


def evaluate_setting(setting, tensor_name: str, t: float):
  """mergekit 0.1.5 `evaluate_setting`: scalars, gradient lists, filter lists."""
  if isinstance(setting, Mapping):
    setting = [setting]
  if is_scalar(setting) or isinstance(setting, tuple) or setting is None:
    return setting
  if isinstance(setting, list):
    if not setting:
      return None
    if all(is_scalar(e) for e in setting):
      if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        return setting[int(t * (len(setting) - 1))]
      scaled = t * (len(setting) - 1)
      i0 = int(scaled)
      i1 = min(len(setting) - 1, i0 + 1)
      frac = scaled - i0
      return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
      if not isinstance(cond, Mapping) or "value" not in cond:
        raise MergeConfigError(f"cannot read parameter setting {setting!r}: a list must hold only "
                               f"numbers (a gradient) or {{filter, value}} entries")
      filt = cond.get("filter")
      if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
        return evaluate_setting(cond["value"], tensor_name, t)
    return None
  raise MergeConfigError(f"cannot read parameter setting {setting!r}")


def validate_setting(where: str, setting):
  """Fail early on settings mergekit would reject at run time."""
  if isinstance(setting, Mapping):
    setting = [setting]
  if isinstance(setting, list):
    for e in setting:
      if isinstance(e, Mapping):
        extra = set(e) - {"filter", "value"}
        if extra or "value" not in e:
          raise MergeConfigError(f"{where}: a conditional parameter takes keys 'filter' and 'value', "
                                 f"got {sorted(e)}")
        validate_setting(where, e["value"])
      elif not is_scalar(e):
        raise MergeConfigError(f"{where}: cannot read list entry {e!r}")
  elif not (is_scalar(setting) or isinstance(setting, tuple) or setting is None):
    raise MergeConfigError(f"{where}: cannot read parameter value {setting!r}")


def resolve_tensor_params(spec, tensor_name: str, t: float,
                          defaults: Tuple[Mapping[str, Any], Mapping[str, Any]]):
  """-> (shared kwargs, per-model kwargs as tuples aligned with spec.models).

  `defaults` = (shared {name: default}, per-model {name: default}); a REQUIRED
  default that resolves to nothing is an error naming the tensor.
  """
  shared_defaults, model_defaults = defaults
  rule = spec.rule_for(tensor_name)
  scopes = ([rule.parameters] if rule is not None else []) + [spec.parameters]
  shared = {}
  for key, default in shared_defaults.items():
    shared[key] = _resolve(key, scopes, tensor_name, t, default, where=tensor_name)
  per_model = {}
  for key, default in model_defaults.items():
    values = []
    for path, own in zip(spec.models, spec.model_parameters):
      values.append(_resolve(key, [own] + scopes, tensor_name, t, default, where=f"{path}.{tensor_name}"))
    per_model[key] = tuple(values)
  return shared, per_model


def _resolve(key, scopes, tensor_name, t, default, where):
  for scope in scopes:
    if scope and key in scope:
      value = evaluate_setting(scope[key], tensor_name, t)
      if value is not None:
        return value
  if default is REQUIRED:
    raise MergeConfigError(f"missing required parameter {key!r} for {where}")
  return default
