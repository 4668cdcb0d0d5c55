"""PEFT LoRA adapter folders <-> h3jax LoRA trees.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors`
with, per adapted nn.Linear `M` (HF name, e.g. `model.layers.3.mlp.up_proj`):
  base_model.model.M.lora_A.weight [r, in]    -> h3jax lora_a [.., in, r] (A^T)
  base_model.model.M.lora_B.weight [out, r]   -> h3jax lora_b [.., r, out] (B^T)
and full tensors for `modules_to_save` / `bias: all|lora_only`
(base_model.model.<HF tensor name>), which replace the base's. PEFT adds
scale * B @ A to W [out, in] with scale = alpha / r (alpha / sqrt(r) with
`use_rslora`); h3jax adds lora_scale * A^T-side factors to the kernel [in, out],
so cfg.lora_scale = scale. HF names come from the one key table (keymap), so
every family h3jax loads is covered. Layers an adapter leaves out
(`layers_to_transform`) get zero factors, and export leaves zero factors out
again, so PEFT -> h3jax -> PEFT gives back the same tensors bit for bit.

Only plain LoRA is read: DoRA, lora_bias, rank/alpha patterns, embedding LoRA,
fan_in_fan_out and other adapter types are one clear `AdapterError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.config import ModelConfig
from h3jax.hf import keymap, st_io
from h3jax.model.params import flatten_dict, unflatten_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.[A-Za-z0-9_]+)?\.weight$")
# adapter_config keys whose non-default value changes the adapted model in a way h3jax does not apply.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
                "use_qalora": False, "use_bdlora": None}


class AdapterError(ValueError):
  """A PEFT adapter h3jax cannot read or write; raised before anything is written."""


@dataclasses.dataclass
class Adapter:
  """A PEFT LoRA adapter read from disk (tensors as numpy, names without the PEFT prefix)."""
  path: str
  config: dict
  lora: Dict[str, Tuple[np.ndarray, np.ndarray]]  # HF module name -> (A [r, in], B [out, r])
  full: Dict[str, np.ndarray]  # HF tensor name -> tensor (modules_to_save, biases)

  @property
  def rank(self) -> int:
    """The h3jax leaf rank: the largest module rank (smaller ones are zero-padded, which adds nothing)."""
    return max((a.shape[0] for a, _ in self.lora.values()), default=int(self.config["r"]))

  @property
  def scale(self) -> float:
    return peft_scale(self.config)

  @property
  def base_model(self) -> Optional[str]:
    return self.config.get("base_model_name_or_path")


def peft_scale(config: dict) -> float:
  r, alpha = int(config["r"]), float(config["lora_alpha"])
  return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_value(pattern, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted suffix."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def is_adapter(path) -> bool:
  return (pathlib.Path(path) / CONFIG_NAME).is_file()


def linear_modules(cfg: ModelConfig) -> Dict[str, Tuple[tuple, tuple]]:
  """HF nn.Linear module name -> (h3jax linear dict path, leaf index), from the key table."""
  out = {}
  for row in keymap.rows(cfg):
    if row.transpose and row.path[-1] == "kernel" and row.hf.endswith(".weight"):
      for idx, name in keymap.expand(row, cfg):
        out[name[:-len(".weight")]] = (row.path[:-1], idx)
  return out


def read_adapter(path) -> Adapter:
  """Reads and checks a PEFT LoRA folder (config + safetensors); tensors stay on the host."""
  path = pathlib.Path(path)
  if not (path / CONFIG_NAME).is_file():
    raise AdapterError(f"{path}: not a PEFT adapter folder (no {CONFIG_NAME})")
  try:
    config = json.loads((path / CONFIG_NAME).read_text())
  except json.JSONDecodeError as e:
    raise AdapterError(f"{path / CONFIG_NAME}: invalid JSON ({e})") from None
  kind = config.get("peft_type", "LORA")
  if kind != "LORA":
    raise AdapterError(f"{path}: adapter type {kind!r} is not supported; h3jax reads LoRA adapters only")
  for key, default in _UNSUPPORTED.items():
    value = config.get(key, default)
    if value not in (default, None, {}, False, []):
      what = "DoRA (use_dora)" if key == "use_dora" else f"{key}={value!r}"
      raise AdapterError(f"{path}: {what} is not supported; h3jax reads plain LoRA adapters only")
  for key in ("r", "lora_alpha"):
    if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
      raise AdapterError(f"{path}: adapter_config.json needs a positive {key!r}, got {config.get(key)!r}")
  if config.get("bias", "none") not in ("none", "all", "lora_only"):
    raise AdapterError(f"{path}: unknown bias mode {config.get('bias')!r}")
  weights = path / WEIGHTS_NAME
  if not weights.is_file():
    other = [p.name for p in path.glob("adapter_model*")]
    raise AdapterError(f"{path}: no {WEIGHTS_NAME}" + (f" (found {other}; only safetensors is read)" if other else ""))
  pairs: Dict[str, Dict[str, np.ndarray]] = {}
  full = {}
  with st_io.SafetensorsReader(weights) as reader:
    for name in reader.keys():
      if not name.startswith(PREFIX):
        raise AdapterError(f"{path}: tensor {name!r} does not start with {PREFIX!r}; not a PEFT causal-LM adapter")
      short = name[len(PREFIX):]
      if "lora_embedding_" in short or "lora_magnitude_vector" in short:
        raise AdapterError(f"{path}: {short!r}: embedding LoRA / DoRA tensors are not supported")
      m = _LORA_RE.match(short)
      if m:
        pairs.setdefault(m["module"], {})[m["ab"]] = reader.get(name)
      elif "lora_" in short:
        raise AdapterError(f"{path}: unrecognised LoRA tensor {short!r}")
      else:
        full[short] = reader.get(name)
  lora = {}
  scale = peft_scale(config)
  for module, ab in sorted(pairs.items()):
    if set(ab) != {"A", "B"}:
      raise AdapterError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    a, b = ab["A"], ab["B"]
    r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
      raise AdapterError(f"{path}: {module}: lora_A {a.shape} / lora_B {b.shape} do not have rank r={r}")
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    s = peft_scale(dict(config, r=r, lora_alpha=alpha))
    if not math.isclose(s, scale, rel_tol=1e-9):  # h3jax applies one lora_scale to every module
      raise AdapterError(f"{path}: {module} has LoRA scale {s} (rank {r}, alpha {alpha}) but the adapter's is "
                         f"{scale}; per-module scales (rank/alpha patterns with other ratios) are not supported")
    lora[module] = (a, b)
  if not lora and not full:
    raise AdapterError(f"{path}: the adapter holds no tensors")
  return Adapter(str(path), config, lora, full)


def _check_targets(adapter: Adapter, modules: Dict[str, tuple]):
  leaf_names = {m.rsplit(".", 1)[-1] for m in modules}
  targets = adapter.config.get("target_modules")
  if isinstance(targets, (list, tuple)):
    # PEFT's rule: a target names a module exactly or is a suffix of it after a '.'
    unknown = sorted(t for t in targets if t not in modules and not any(m.endswith("." + t) for m in modules))
    if unknown:
      raise AdapterError(f"{adapter.path}: unknown target module(s) {unknown}; this model's linear layers are "
                         f"{sorted(leaf_names)}")
  for module in adapter.lora:
    if module not in modules:
      raise AdapterError(f"{adapter.path}: LoRA on {module!r}, which is not a linear layer of this base model "
                         f"(known: {sorted(leaf_names)})")


def apply_adapter(cfg: ModelConfig, params: dict, adapter: Adapter) -> Tuple[ModelConfig, dict]:
  """(cfg with lora_scale, params with lora_a/lora_b leaves and modules_to_save tensors) for a base."""
  if cfg.lora_scale != 1.0 or any(k[-1] in ("lora_a", "lora_b") for k in flatten_dict(params)):
    raise AdapterError(f"{adapter.path}: the base model already carries LoRA factors; merge them first")
  modules = linear_modules(cfg)
  _check_targets(adapter, modules)
  flat = dict(flatten_dict(params))
  r = adapter.rank
  grouped: Dict[tuple, list] = {}
  for module, (a, b) in adapter.lora.items():
    lin, idx = modules[module]
    grouped.setdefault(lin, []).append((idx, module, a, b))
  for lin, items in grouped.items():
    kernel = flat[lin + ("kernel",)]
    *lead, d_in, d_out = kernel.shape
    A = np.zeros((*lead, d_in, r), items[0][2].dtype)
    B = np.zeros((*lead, r, d_out), items[0][3].dtype)
    for idx, module, a, b in items:
      if a.shape[1] != d_in or b.shape[0] != d_out:
        raise AdapterError(f"{adapter.path}: {module}: adapter is for another base model (lora_A {a.shape}, "
                           f"lora_B {b.shape}; this base's weight is [{d_out}, {d_in}])")
      if a.dtype != A.dtype or b.dtype != B.dtype:
        raise AdapterError(f"{adapter.path}: {module}: mixed LoRA dtypes ({a.dtype}, {b.dtype})")
      A[idx][..., :a.shape[0]] = a.T
      B[idx][..., :a.shape[0], :] = b.T
    flat[lin + ("lora_a",)] = jnp.asarray(A)
    flat[lin + ("lora_b",)] = jnp.asarray(B)
  names = keymap.hf_names(cfg)
  for name, t in adapter.full.items():
    if name not in names:
      raise AdapterError(f"{adapter.path}: saved module tensor {name!r} is not a tensor of this base model")
    row, idx = names[name]
    leaf = flat[row.path]
    want = np.swapaxes(np.empty(leaf.shape[len(idx):]), -1, -2).shape if row.transpose else leaf.shape[len(idx):]
    if tuple(t.shape) != tuple(want):
      raise AdapterError(f"{adapter.path}: {name} has shape {t.shape} but this base's is {tuple(want)}; adapter "
                         f"for another base model?")
    value = jnp.asarray(np.swapaxes(t, -1, -2) if row.transpose else t, leaf.dtype)
    flat[row.path] = leaf.at[idx].set(value) if idx else value
  return cfg.replace(lora_scale=adapter.scale), unflatten_dict(flat)


def load_with_adapter(base, adapter_dir, dtype: Optional[str] = None) -> Tuple[ModelConfig, dict]:
  """(cfg, params) of an HF base folder plus a PEFT adapter (mergekit's `base+adapter`)."""
  from h3jax.hf.load import load_pretrained
  adapter = read_adapter(adapter_dir)  # check before the (large) base is read
  cfg, params = load_pretrained(base, dtype=dtype)
  return apply_adapter(cfg, params, adapter)


def split_ref(ref: str, default_base=None) -> Tuple[str, Optional[str]]:
  """'BASE+ADAPTER' -> (BASE, ADAPTER); an adapter folder -> (its recorded base or default_base, it);
  anything else -> (ref, None). A '+' inside an existing path is part of the path."""
  ref = str(ref)
  if "+" in ref and not pathlib.Path(ref).exists():
    base, _, adapter = ref.rpartition("+")
    if not base or not adapter:
      raise AdapterError(f"{ref!r}: expected MODEL+ADAPTER")
    return base, adapter
  if is_adapter(ref):
    base = default_base
    if base is None:
      base = read_adapter(ref).base_model
      if not base or not pathlib.Path(base).is_dir():
        raise AdapterError(f"{ref}: PEFT adapter whose base_model_name_or_path {base!r} is not a local folder; "
                           f"name the base as BASE+{ref}")
    return str(base), ref
  return ref, None


# ---------------------------------------------------------------------------
# Export.


def adapter_tensors(cfg: ModelConfig, params: dict, modules_to_save: Sequence[str] = ()) -> Dict[str, np.ndarray]:
  """PEFT tensor name -> numpy tensor for every LoRA pair (all-zero factors left out) and the full
  tensors of `modules_to_save` (HF module names such as 'lm_head' or 'embed_tokens')."""
  flat = flatten_dict(params)
  modules = linear_modules(cfg)
  by_leaf: Dict[tuple, list] = {}
  for name, (lin, idx) in modules.items():
    by_leaf.setdefault(lin, []).append((idx, name))
  out = {}
  lins = sorted(k[:-1] for k in flat if k[-1] == "lora_a")
  for lin in lins:
    if lin not in by_leaf:
      raise AdapterError(f"LoRA on {'/'.join(lin)} has no PEFT equivalent (transformers' MoE experts are fused "
                         f"parameters, not nn.Linear modules); merge it or train without it")
    A = np.asarray(jax.device_get(flat[lin + ("lora_a",)]))
    B = np.asarray(jax.device_get(flat[lin + ("lora_b",)]))
    for idx, name in by_leaf[lin]:
      a, b = A[idx], B[idx]
      if not a.any() and not b.any():
        continue  # a layer the adapter does not touch
      out[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
      out[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
  names = keymap.hf_names(cfg)
  for module in modules_to_save:
    hits = [n for n in names if n[:-len(".weight")].split(".")[-1] == module or n[:-len(".weight")] == module]
    if not hits:
      raise AdapterError(f"modules_to_save: {module!r} is not a module of this model")
    for name in hits:
      row, idx = names[name]
      leaf = np.asarray(jax.device_get(flat[row.path]))[idx]
      out[PREFIX + name] = np.ascontiguousarray(np.swapaxes(leaf, -1, -2) if row.transpose else leaf)
  return out


def check_only_lora_trained(params: dict, base_params: dict, base_name="the base") -> None:
  """Raises unless every non-LoRA leaf of `params` equals the base's (a PEFT adapter holds LoRA only)."""
  flat, base = flatten_dict(params), flatten_dict(base_params)
  changed = []
  for k, v in flat.items():
    if k[-1] in ("lora_a", "lora_b"):
      continue
    if k not in base or tuple(base[k].shape) != tuple(v.shape):
      raise AdapterError(f"{'/'.join(k)} {tuple(v.shape)} does not match {base_name}; the run was not trained "
                         f"from this base")
    if not np.array_equal(np.asarray(jax.device_get(v), np.float32), np.asarray(jax.device_get(base[k]), np.float32)):
      changed.append("/".join(k))
  if changed:
    raise AdapterError(f"the run changed non-LoRA weights {changed[:4]} of {base_name}; a PEFT adapter would drop "
                       f"them (export with --format=hf)")


def save_adapter(cfg: ModelConfig, params: dict, out_dir, *, base_model_name_or_path=None,
                 modules_to_save: Sequence[str] = (), adapter_config: Optional[dict] = None,
                 overwrite: bool = False) -> pathlib.Path:
  """Writes the LoRA leaves of `params` as a PEFT adapter folder loadable by PeftModel.from_pretrained.

  r comes from the factors, lora_alpha = cfg.lora_scale * r (no rslora) unless
  `adapter_config` (the config of an adapter read earlier) is given: then its
  r / lora_alpha / use_rslora / bias / modules_to_save are kept (they must give
  the same scale). The base's non-LoRA weights are not written.
  """
  from h3jax.hf.export import atomic_output_dir
  if cfg.is_moe:
    raise AdapterError("PEFT export of an MoE (Stage B) run is not supported: transformers' Mixtral keeps experts "
                       "and router as fused parameters, not nn.Linear modules; export it with --format=hf")
  flat = flatten_dict(params)
  ranks = {int(v.shape[-1]) for k, v in flat.items() if k[-1] == "lora_a"}
  if not ranks:
    raise AdapterError("params hold no LoRA factors (lora_a / lora_b); nothing to export")
  if len(ranks) > 1:
    raise AdapterError(f"LoRA factors of different ranks {sorted(ranks)}; PEFT needs one r (no rank_pattern)")
  r = ranks.pop()
  base_cfg = dict(adapter_config or {})
  if base_cfg:
    if int(base_cfg["r"]) != r or not math.isclose(peft_scale(base_cfg), cfg.lora_scale, rel_tol=1e-6):
      raise AdapterError(f"adapter_config (r={base_cfg['r']}, scale {peft_scale(base_cfg)}) does not match the "
                         f"params (r={r}, lora_scale {cfg.lora_scale})")
    modules_to_save = tuple(modules_to_save) or tuple(base_cfg.get("modules_to_save") or ())
  tensors = adapter_tensors(cfg, params, modules_to_save)
  if adapter_config and base_cfg.get("bias", "none") != "none":
    raise AdapterError("re-exporting an adapter with trained biases (bias != 'none') is not supported")
  targets = sorted({n[len(PREFIX):].split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors if ".lora_A." in n})
  alpha = cfg.lora_scale * r
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
      "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": 0.0,
      "target_modules": targets, "use_rslora": False, "use_dora": False, "bias": "none",
      "modules_to_save": list(modules_to_save) or None, "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True, "base_model_name_or_path": base_model_name_or_path,
  }
  for key in ("r", "lora_alpha", "use_rslora", "lora_dropout", "task_type", "base_model_name_or_path",
              "layers_to_transform", "layers_pattern", "revision"):
    if key in base_cfg and not (key == "base_model_name_or_path" and base_model_name_or_path):
      config[key] = base_cfg[key]
  with atomic_output_dir(out_dir, overwrite) as tmp:
    writer = st_io.SafetensorsWriter(tmp, max_shard_size="1000GB")
    for name in sorted(tensors):
      writer.add(name, tensors[name])
    writer.close()
    (tmp / st_io.SINGLE_NAME).rename(tmp / WEIGHTS_NAME)
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
  return pathlib.Path(out_dir)
