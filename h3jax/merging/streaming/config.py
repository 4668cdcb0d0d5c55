"""Merge configurations: mergekit 0.1.5 YAML (read unchanged) and ml_collections `.py` files.

Both become one `MergeSpec` (h3jax.merging.streaming.spec). Parameter values keep mergekit's setting syntax and
are resolved per tensor by `resolve_tensor_params` exactly as mergekit 0.1.5's
`evaluate_setting` / `resolve_parameters` do:
  * a scalar;
  * a *gradient* list, interpolated linearly over t = layer / (L - 1) (t = 0 for
    tensors outside the layer stack, t = 1 for a one-layer model);
  * a list of `{filter: substring, value: setting}`, first match wins.
Precedence: the model's own `parameters` -> global `parameters` -> default.

mergekit YAML is checked against mergekit's own parameter table for its methods
(unknown or misplaced keys are errors, as are `slices`/`modules`, which h3jax
does not implement). A `.py` config (a `get_config()` returning a ConfigDict)
reaches every h3jax method and knob: its `parameters` use h3jax keyword names;
a Python *tuple* is passed through literally (e.g. per-task `alpha` of tsv_m),
a *list* is a mergekit gradient.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Mapping, Optional

import yaml

from h3jax.hf import refs
from h3jax.merging.streaming import vocab
from h3jax.merging.streaming.settings import MergeConfigError, validate_setting
from h3jax.merging.streaming.spec import (BASE_FREE, BASE_OPTIONAL, DTYPES, MERGEKIT_METHODS, N_MODELS,
                                          MergeSpec, Rule, accepted_kwargs)

# Top-level keys of a mergekit YAML that h3jax reads.
_YAML_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
              "tokenizer_source", "tokenizer", "chat_template"}
_YAML_UNSUPPORTED = {"slices": "layer slices other than a mergekit YAML's passthrough stacking",
                     "modules": "multi-module merges"}
# Top-level keys of an h3jax `.py` config.
_PY_KEYS = _YAML_KEYS | {"seed", "max_shard_size", "rules", "embeddings", "out_shard_size"}


class _UniqueKeyLoader(yaml.SafeLoader):
  """safe_load, except that a key repeated in one mapping is an error (PyYAML keeps the last)."""

  def construct_mapping(self, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
      key = self.construct_object(key_node, deep=deep)
      if key in seen:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (PyYAML would keep the "
                                                f"last one silently)", key_node.start_mark)
      seen.add(key)
    return super().construct_mapping(node, deep=deep)


def load_config(path, where: Optional[str] = None) -> MergeSpec:
  """A mergekit YAML (.yml/.yaml) or an ml_collections .py config -> MergeSpec. `path` may also be the
  config a `.py` file's get_config() returned (a ConfigDict or dict, e.g. with `--config.x` overrides
  applied), named `where` in errors."""
  if not isinstance(path, (str, pathlib.PurePath)):
    return from_py_config(path, where=where or "config")
  path = pathlib.Path(path)
  if not path.is_file():
    raise MergeConfigError(f"config file not found: {path}")
  if path.suffix in (".yml", ".yaml"):
    try:
      raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:  # one line: the problem and where, without PyYAML's source excerpt
      mark = getattr(e, "problem_mark", None)
      where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
      raise MergeConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    return from_mergekit_dict(raw, where=str(path))
  if path.suffix == ".py":
    return from_py_config(_load_py(path), where=str(path))
  raise MergeConfigError(f"{path}: unknown config type {path.suffix!r}; use a mergekit .yaml/.yml or "
                         f"an ml_collections .py file")


def _load_py(path):
  spec = importlib.util.spec_from_file_location(f"_h3jax_merge_cfg_{abs(hash(str(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise MergeConfigError(f"{path}: a .py merge config must define get_config()")
  return module.get_config()


def _model_path(ref, where) -> str:
  """A model reference -> path string (`h3jax.hf.refs.model_path`), errors as MergeConfigError."""
  return refs.model_path(ref, where, MergeConfigError)


def _check_dtype(key, value, where):
  if value is not None and value not in DTYPES:
    raise MergeConfigError(f"{where}: {key} must be one of {DTYPES}, got {value!r}")


def _read_common(raw, where, allowed):
  if not isinstance(raw, Mapping):
    raise MergeConfigError(f"{where}: a merge config must be a mapping, got {type(raw).__name__}")
  for key, what in _YAML_UNSUPPORTED.items():
    if key in raw:
      raise MergeConfigError(f"{where}: {key!r} ({what}) is not supported by h3jax; use 'models'")
  unknown = sorted(set(raw) - allowed)
  if unknown:
    raise MergeConfigError(f"{where}: unknown top-level key(s) {unknown}; expected some of {sorted(allowed)}")
  if "merge_method" not in raw:
    raise MergeConfigError(f"{where}: 'merge_method' is required")
  models = raw.get("models")
  if not models:
    raise MergeConfigError(f"{where}: 'models' must list at least one model")
  base = raw.get("base_model")
  base = _model_path(base, f"{where}: base_model") if base is not None else None
  paths, params = [], []
  for i, entry in enumerate(models):
    if not isinstance(entry, Mapping) or "model" not in entry:
      raise MergeConfigError(f"{where}: models[{i}] must be a mapping with a 'model' key")
    extra = set(entry) - {"model", "parameters"}
    if extra:
      raise MergeConfigError(f"{where}: models[{i}] has unknown key(s) {sorted(extra)}")
    paths.append(_model_path(entry["model"], f"{where}: models[{i}]"))
    params.append(dict(entry.get("parameters") or {}))
  for key in ("dtype", "out_dtype"):
    _check_dtype(key, raw.get(key), where)
  tok = vocab.parse_config(raw, where, _model_path, ([base] if base else []) + paths)
  _check_chat_template(raw.get("chat_template"), where)
  return base, paths, params, dict(raw.get("parameters") or {}), tok


# mergekit's bundled template names: h3jax does not ship their text (paste the Jinja instead).
_NAMED_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def _check_chat_template(value, where):
  """mergekit's rules: None, 'auto' (the most common template among the inputs) or Jinja text."""
  if value is None or value == "auto":
    return
  if not isinstance(value, str):
    raise MergeConfigError(f"{where}: chat_template must be a string, got {value!r}")
  if value in _NAMED_TEMPLATES:
    raise MergeConfigError(f"{where}: chat_template {value!r} names one of mergekit's bundled templates, which "
                           f"h3jax does not ship; put the Jinja text itself (or 'auto') in the config")
  if len(value) < 20 or "{" not in value:
    raise MergeConfigError(f"{where}: invalid chat_template {value!r}; expected 'auto' or a Jinja template")


def _drop_base(base, paths, params, where):
  """mergekit treats a base listed among `models` as the base only."""
  keep = [(p, q) for p, q in zip(paths, params) if p != base]
  if not keep:
    raise MergeConfigError(f"{where}: the only model listed is the base_model {base!r}; list at least one "
                           f"other model to merge into it")
  return tuple(p for p, _ in keep), tuple(q for _, q in keep)


def from_mergekit_dict(raw, where: str = "config") -> MergeSpec:
  """A mergekit 0.1.5 YAML document (as a dict) -> MergeSpec with mergekit semantics."""
  if isinstance(raw, Mapping) and "slices" in raw:
    from h3jax.merging.streaming import slices as slices_lib
    sl = slices_lib.parse_slices(raw, where, _model_path)
    base = _model_path(raw["base_model"], f"{where}: base_model") if raw.get("base_model") else None
    for key in ("dtype", "out_dtype"):
      _check_dtype(key, raw.get(key), where)
    if raw.get("tokenizer_source", "base") not in (None, "base"):
      raise MergeConfigError(f"{where}: tokenizer_source {raw['tokenizer_source']!r} is not supported with "
                             f"slices; h3jax copies the base model's tokenizer there (tokenizer_source: base)")
    _check_chat_template(raw.get("chat_template"), where)
    return MergeSpec(method="passthrough", models=tuple(dict.fromkeys(s[0] for s in sl)), base_model=base,
                     dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"), chat_template=raw.get("chat_template"),
                     flavour="mergekit", slices=sl)
  base, paths, params, global_params, tok = _read_common(raw, where, _YAML_KEYS)
  method = raw["merge_method"]
  if method not in MERGEKIT_METHODS:
    raise MergeConfigError(f"{where}: unknown merge_method {method!r} for a mergekit YAML; h3jax reads "
                           f"{sorted(MERGEKIT_METHODS)} (use a .py config for the other h3jax methods)")
  shared, per_model = MERGEKIT_METHODS[method]
  for key, value in global_params.items():
    if key not in shared and key not in per_model:
      raise MergeConfigError(f"{where}: unknown parameter {key!r} for {method}; expected some of "
                             f"{sorted(set(shared) | set(per_model))}")
    validate_setting(f"{where}: parameters.{key}", value)
  for path, p in zip(paths, params):
    for key, value in p.items():
      if key not in per_model:
        hint = " (a global parameter; put it under the top-level 'parameters')" if key in shared else ""
        raise MergeConfigError(f"{where}: unknown parameter {key!r} for model {path} in {method}{hint}")
      validate_setting(f"{where}: {path}.parameters.{key}", value)
  if method in BASE_OPTIONAL and base is not None:
    paths, params = _drop_base(base, paths, params, where)
  elif method in BASE_OPTIONAL:
    paths, params = tuple(paths), tuple(params)
  elif method not in BASE_FREE:
    if base is None:
      raise MergeConfigError(f"{where}: {method} needs a base_model")
    paths, params = _drop_base(base, paths, params, where)
  elif base is not None and base not in paths:
    raise MergeConfigError(f"{where}: {method} merges only its listed models; list base_model {base!r} "
                           f"under models{' with a weight' if method == 'linear' else ''}, or remove "
                           f"base_model")
  else:
    tok = dict(tok, tokenizer_base=base)  # mergekit: the tokenizer base and preferred row donor
    base = None
    paths, params = tuple(paths), tuple(params)
  n_want = N_MODELS.get(method)
  if n_want is not None and len(paths) != n_want:
    count = {1: "one", 2: "two"}[n_want]
    if method in BASE_FREE:
      what = f"exactly {count} model{'s' * (n_want > 1)}"
    elif method in BASE_OPTIONAL:
      what = f"exactly {count} models besides an optional base_model"
    else:
      what = f"a base_model and exactly {count} other model{'s' * (n_want > 1)}"
    raise MergeConfigError(f"{where}: {method} needs {what}, got {len(paths)}")
  if method == "model_stock" and len(paths) < 2:
    raise MergeConfigError(f"{where}: model_stock needs at least two models besides the base")
  return MergeSpec(method=method, models=paths, base_model=base, model_parameters=params,
                   parameters=global_params, dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"),
                   chat_template=raw.get("chat_template"), flavour="mergekit", **tok)


def from_py_config(cfg, where: str = "config") -> MergeSpec:
  """An ml_collections ConfigDict (or plain dict) -> MergeSpec with h3jax keyword names."""
  raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  base, paths, params, global_params, tok = _read_common(raw, where, _PY_KEYS)
  method = raw["merge_method"]
  method_fn = _h3jax_method(method, where)
  accepted = accepted_kwargs(method_fn)
  for key, value in list(global_params.items()) + [(k, v) for p in params for k, v in p.items()]:
    if accepted is not None and key not in accepted:
      raise MergeConfigError(f"{where}: unknown parameter {key!r} for h3jax method {method}; it takes "
                             f"{sorted(accepted)}")
    validate_setting(f"{where}: parameter {key}", value)
  rules = []
  for i, r in enumerate(raw.get("rules") or ()):
    r = dict(r)
    extra = set(r) - {"filter", "action", "parameters"}
    if extra or "filter" not in r:
      raise MergeConfigError(f"{where}: rules[{i}] takes keys filter, action, parameters; got {sorted(r)}")
    action = r.get("action", "merge")
    if action not in ("merge", "base", "skip"):
      raise MergeConfigError(f"{where}: rules[{i}].action must be merge|base|skip, got {action!r}")
    for key in (r.get("parameters") or {}):
      if accepted is not None and key not in accepted:
        raise MergeConfigError(f"{where}: rules[{i}] sets unknown parameter {key!r} for {method}")
    rules.append(Rule(filter=r["filter"], action=action, parameters=dict(r.get("parameters") or {})))
  embeddings = raw.get("embeddings", "merge")
  if embeddings not in ("merge", "base"):
    raise MergeConfigError(f"{where}: embeddings must be 'merge' or 'base', got {embeddings!r}")
  if embeddings == "base":  # keep the base's embeddings and head (FusionBench's merge_backbone)
    rules = [Rule("embed_tokens", "base"), Rule("lm_head", "base")] + rules
  if _needs_base(method_fn, method):
    if base is None:
      raise MergeConfigError(f"{where}: {method} needs a base_model")
    paths, params = _drop_base(base, paths, params, where)
  elif method in BASE_OPTIONAL and base is not None:  # the base is used once, as the base
    paths, params = _drop_base(base, paths, params, where)
  else:
    paths, params = tuple(paths), tuple(params)
  seed = raw.get("seed", 0)
  if not isinstance(seed, int):
    raise MergeConfigError(f"{where}: seed must be an int, got {seed!r}")
  return MergeSpec(method=method, models=paths, base_model=base, model_parameters=params,
                   parameters=global_params, dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"),
                   chat_template=raw.get("chat_template"), seed=seed, **tok,
                   max_shard_size=str(raw.get("max_shard_size", raw.get("out_shard_size", "5GB"))),
                   rules=tuple(rules), flavour="h3jax")


def _h3jax_method(name, where):
  from h3jax import merging  # the transforms (merge-core); imported lazily for a cheap CLI --help
  try:
    return merging.get_method(name)
  except (KeyError, ValueError) as e:
    raise MergeConfigError(f"{where}: unknown merge_method {name!r}; h3jax has {sorted(merging.METHODS)}") from e


def _needs_base(fn, name) -> bool:
  from h3jax import merging
  return name not in getattr(merging, "BASE_FREE", BASE_FREE)
