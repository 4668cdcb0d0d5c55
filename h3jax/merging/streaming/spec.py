"""A parsed merge (`MergeSpec`, `Rule`), mergekit 0.1.5's method tables, and the per-tensor keyword
arguments of a method (`accepted_kwargs`, `method_defaults`, `h3jax_kwargs`).

`h3jax.merging.streaming.config` reads merge config files into a `MergeSpec`; the driver resolves its
parameters per tensor (`h3jax.merging.streaming.settings`) into the keyword arguments built here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Optional, Sequence, Tuple

from h3jax import rules as rules_lib
from h3jax.merging.streaming import vocab
from h3jax.merging.streaming.settings import REQUIRED, MergeConfigError

# mergekit 0.1.5 parameter tables for the methods h3jax shares with it:
# name -> (shared {param: default}, per-model {param: default}); REQUIRED = no default.
_TA_SHARED = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
_TA_MODEL = {"weight": REQUIRED, "density": 1.0}


def _ta(normalize, rescale, **model_extra):
  return ({**_TA_SHARED, "normalize": normalize, "rescale": rescale}, {**_TA_MODEL, **model_extra})


MERGEKIT_METHODS = {
    "linear": ({"normalize": True}, {"weight": REQUIRED}),
    "task_arithmetic": _ta(False, False),
    "ties": _ta(True, False),
    "dare_ties": _ta(False, True),
    "dare_linear": _ta(False, True),
    "breadcrumbs": _ta(False, False, gamma=0.01),
    "breadcrumbs_ties": _ta(False, False, gamma=0.01),
    "della": _ta(True, True, epsilon=0.15),
    "della_linear": _ta(False, True, epsilon=0.15),
    "slerp": ({"t": REQUIRED}, {}),
    "model_stock": ({"filter_wise": False}, {}),
    "nuslerp": ({"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": REQUIRED}),
    "multislerp": ({"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, {}),
    "nearswap": ({"t": REQUIRED}, {}),
    "sce": ({"int8_mask": False, "select_topk": 1.0}, {}),
    "passthrough": ({}, {"scale": None}),
    "arcee_fusion": ({}, {}),
    "ram": ({"epsilon": 1e-5}, {}),
    "ramplus_tl": ({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}),
}
# Methods that need no base model (everything else is base-relative).
BASE_FREE = ("linear", "passthrough")
# Methods that use a base_model when one is given (task vectors for the slerps; one more input
# to average for karcher) and run without one too.
BASE_OPTIONAL = ("nuslerp", "multislerp", "karcher")
# Exact number of models besides the base that a mergekit method takes.
N_MODELS = {"slerp": 1, "nuslerp": 2, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1}
# Keyword names that are per-model sequences aligned with `models` in h3jax.
PER_MODEL_KEYS = ("weight", "density", "gamma", "epsilon")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of the path -> rule table (first matching filter wins).

  `filter` is a substring of the tensor name or a regex written `re:<pattern>`.
  action: "merge" (with optional per-tensor `parameters` overriding the
  global ones), "base" (copy the base tensor unchanged) or "skip" (leave out).
  """
  filter: str
  action: str = "merge"
  parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def matches(self, name: str) -> bool:  # mergekit's filter is a substring: `sub:` in h3jax.rules
    f = self.filter
    return f == "*" or rules_lib.matches(f if f.startswith("re:") else "sub:" + f, name)


@dataclasses.dataclass(frozen=True)
class MergeSpec:
  """A parsed, validated merge: what to merge, how, and where the knobs are."""
  method: str
  models: Tuple[str, ...]
  base_model: Optional[str] = None
  model_parameters: Tuple[Mapping[str, Any], ...] = ()
  parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dtype: Optional[str] = None  # inputs are cast to this on load (mergekit `dtype`)
  out_dtype: Optional[str] = None  # saved dtype; default: the base's (or first model's) dtype
  # None: the inputs share a vocabulary and the base's tokenizer files are copied (mergekit's default);
  # "base" | "union" | a model path: vocabularies aligned by token (h3jax.merging.streaming.vocab).
  tokenizer_source: Optional[str] = None
  tokens: Tuple[vocab.TokenRule, ...] = ()  # a `tokenizer: tokens:` block
  pad_to_multiple_of: Optional[int] = None
  tokenizer_base: Optional[str] = None  # a base-free method's base_model listed among its models (mergekit)
  chat_template: Optional[str] = None  # "auto" | a Jinja template; written to the output tokenizer
  seed: int = 0
  max_shard_size: str = "5GB"
  rules: Tuple[Rule, ...] = ()
  flavour: str = "h3jax"  # "mergekit": mergekit 0.1.5 parameter table and defaults
  slices: Tuple[Tuple[str, int, int, Any], ...] = ()  # passthrough layer stacking (h3jax.merging.streaming.slices)

  @property
  def inputs(self) -> Tuple[str, ...]:
    """Every distinct folder read: base first, then the models."""
    return ((self.base_model,) if self.base_model else ()) + self.models

  def rule_for(self, name: str) -> Optional[Rule]:
    for rule in self.rules:
      if rule.matches(name):
        return rule
    return None


# Keywords every h3jax transform takes through **kw (see h3jax.merging.basic).
_COMMON_KWARGS = {"rules", "lora_scale", "lambda"}


def accepted_kwargs(fn) -> Optional[set]:
  """Keyword names a transform takes (its named knobs plus the common ones)."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  params = list(sig.parameters.values())
  names = {p.name for p in params[2:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
  if any(p.kind == p.VAR_KEYWORD for p in params):
    names |= _COMMON_KWARGS
  if "lambda_" in names:
    names.add("lambda")
  return names


def method_defaults(spec: MergeSpec) -> Tuple[dict, dict]:
  """(shared, per-model) parameter defaults for resolving `spec` per tensor."""
  if spec.flavour == "mergekit":
    return MERGEKIT_METHODS[spec.method]
  keys = set(spec.parameters) | {k for p in spec.model_parameters for k in p}
  keys |= {k for r in spec.rules for k in r.parameters}
  shared = {k: None for k in keys if k not in PER_MODEL_KEYS}
  per_model = {k: None for k in keys if k in PER_MODEL_KEYS}
  return shared, per_model


def h3jax_kwargs(shared: Mapping[str, Any], per_model: Mapping[str, Sequence], spec: MergeSpec) -> dict:
  """Resolved parameters -> keyword arguments of the h3jax transform."""
  out = {}
  for key, value in shared.items():
    if value is None:
      continue
    if spec.flavour == "mergekit" and key == "int8_mask":
      continue  # only the sign mask's storage dtype in mergekit; numerically identical
    out["lambda_" if key == "lambda" else key] = value
  for key, values in per_model.items():
    if all(v is None for v in values):
      continue
    if any(v is None for v in values):
      raise MergeConfigError(f"parameter {key!r} is set for some models but not all")
    out[key] = tuple(values)
  return out
