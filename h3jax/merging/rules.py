"""Which tensors a merge touches, and with which hyper-parameters: path -> rule tables.

A path is the slash-joined key path of a params leaf ("layers/attn/q_proj/kernel");
for HF tensors the driver passes the HF name instead, and the same tables work.

A rule table is a sequence of `(pattern, overrides)` pairs; patterns are the one
dialect of `h3jax.rules`: a glob (`fnmatch`, `*` also crosses `/`), `re:<regex>`
(re.search) or `sub:<text>` (substring, mergekit's `filter`). For each hyper-parameter the FIRST matching rule
that sets it wins (mergekit's filter order), then the call's own value. Special
override keys:
  keep_base: True  -> the output is the base's tensor (untouched);
  exclude:   True  -> the method's fallback for excluded keys (FusionBench
                      `exclude_keys`: mean task vector for the SVD methods; the
                      base for every other method);
  batch_dims: n    -> the first n axes index separate tensors (stacked layers).

Hyper-parameter values may be mergekit *gradients*: a list of numbers
interpolated over the layer index t = i / (L - 1) (t = 0 for non-layer tensors).
Per-model values (weight, density, ...) are sequences aligned with `models`,
each element a number or a gradient.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from h3jax import rules as rules_lib
from h3jax.rules import path_str  # noqa: F401  (re-exported: merge code imports it from here)

# Leading axes that stack separate HF tensors in the h3jax params layout.
DEFAULT_STACK_RULES = (
    ("layers/moe/experts/*", {"batch_dims": 2}),
    ("layers/*", {"batch_dims": 1}),
)
# Keys that are never merge hyper-parameters (handled by the engine itself).
SPECIAL_KEYS = ("keep_base", "exclude", "batch_dims")
# Tuple-valued hyper-parameters that are not layer gradients.
NON_GRADIENT_KEYS = ("thresholds", "sp_range", "alpha", "coef")
# Tied embeddings / embeddings and heads; use with `keep_embeddings_rules()`.
EMBEDDING_PATTERNS = ("embed/embedding", "lm_head/kernel", "sub:embed_tokens", "sub:lm_head")


def matches(pattern: str, path: str) -> bool:
  return rules_lib.matches(pattern, path)


def validate_rules(rules) -> tuple:
  """Normalises a rule table to a tuple of (pattern, dict), with a clear error."""
  if rules is None:
    return ()
  if isinstance(rules, Mapping):
    rules = list(rules.items())
  out = []
  for item in rules:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], Mapping)):
      raise ValueError(f"each rule must be (pattern: str, overrides: dict), got {item!r}")
    out.append((rules_lib.check_pattern(item[0]), dict(item[1])))
  return tuple(out)


def resolve(path: str, rules, hparams: Mapping[str, Any]) -> dict:
  """Hyper-parameters for one tensor: first matching rule per key, then `hparams`."""
  out = dict(hparams)
  seen = set()
  for pattern, overrides in validate_rules(rules):
    if matches(pattern, path):
      for k, v in overrides.items():
        if k not in seen:
          out[k] = v
          seen.add(k)
  return out


def keep_embeddings_rules() -> tuple:
  """Rules that keep the base's embeddings and lm_head (FusionBench merge_backbone)."""
  return tuple((p, {"keep_base": True}) for p in EMBEDDING_PATTERNS)


def default_batch_dims(path: str) -> int:
  return resolve(path, DEFAULT_STACK_RULES, {"batch_dims": 0})["batch_dims"]


def _is_seq(v) -> bool:
  return isinstance(v, (list, tuple))


def gradient_value(value, t: float):
  """mergekit's gradient: numbers interpolated linearly at t in [0, 1]; scalars as is."""
  if not _is_seq(value):
    return value
  if not value:
    raise ValueError("empty gradient list")
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    return value[int(t * (len(value) - 1))]
  scaled = t * (len(value) - 1)
  i0 = int(scaled)
  i1 = min(len(value) - 1, i0 + 1)
  frac = scaled - i0
  return (1 - frac) * value[i0] + frac * value[i1]


def per_model(name: str, value, n: int) -> tuple:
  """A per-model hyper-parameter as an n-tuple (scalars broadcast), with a clear error."""
  if _is_seq(value):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} values but there are {n} models")
    return tuple(tuple(v) if _is_seq(v) else v for v in value)
  return (value,) * n


def has_gradient(hp: Mapping[str, Any], per_model_keys: Sequence[str]) -> bool:
  for k, v in hp.items():
    if k in per_model_keys:
      if any(_is_seq(e) for e in v):
        return True
    elif _is_seq(v) and k not in NON_GRADIENT_KEYS:
      return True
  return False


def at_layer(hp: Mapping[str, Any], per_model_keys: Sequence[str], t: float) -> dict:
  """Resolves every gradient in `hp` at layer position t."""
  out = {}
  for k, v in hp.items():
    if k in per_model_keys:
      out[k] = tuple(gradient_value(e, t) for e in v)
    elif k in NON_GRADIENT_KEYS:
      out[k] = v
    else:
      out[k] = gradient_value(v, t)
  return out
