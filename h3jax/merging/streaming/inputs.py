"""The streaming driver's inputs and outputs: checkpoints, compatibility checks, side files.

Inputs are Llama-family HF folders (config.json + model.safetensors or a sharded
index), raw `.safetensors` files/folders without a config, or mergekit's
`MODEL+ADAPTER` (a PEFT LoRA folder merged into MODEL as each tensor is read,
see `MergedReader`). A tied `lm_head`
(absent from the files) is neither read nor written; an input that lacks
`lm_head.weight` while others have it contributes its `embed_tokens.weight`.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import shutil
import sys
from typing import List, Optional

import ml_dtypes
import numpy as np

from h3jax.hf import adapters
from h3jax.hf.st_io import SafetensorsError, SafetensorsReader

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Config keys that must agree for two HF folders to be mergeable.
_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
# Non-weight files copied from the base when vocabularies are not re-aligned (no tokenizer_source).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")
TIED_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


class MergeError(ValueError):
  """Inputs that cannot be merged; raised before anything is written."""


def layer_position(name: str, num_layers: int) -> float:
  """mergekit's t: layer / (L - 1) for layer tensors (1 when L == 1), 0 otherwise."""
  m = _LAYER_RE.search(name)
  if m is None:
    return 0.0
  if num_layers <= 1:
    return 1.0
  return int(m.group(1)) / (num_layers - 1)


class MergedReader:
  """A SafetensorsReader-like view of BASE with a PEFT adapter merged in, one tensor at a time.

  Like mergekit (PeftModel.merge_and_unload), each adapted weight becomes
  W + cast(scale * (B @ A)) in W's dtype (the product in float32), and
  modules_to_save / bias tensors replace the base's. HF tensor names are the
  adapter's module names + '.weight', so no model config is needed.
  """

  def __init__(self, base_reader, adapter: adapters.Adapter):
    self._base, self.adapter = base_reader, adapter
    self.metadata = dict(getattr(base_reader, "metadata", {}))
    names = set(base_reader.keys())
    for module, (a, b) in adapter.lora.items():
      name = module + ".weight"
      if name not in names:
        raise adapters.AdapterError(f"{adapter.path}: LoRA on {module!r}, which is not a weight of the base "
                                    f"model (unknown target module)")
      if tuple(base_reader.shape(name)) != (b.shape[0], a.shape[1]):
        raise adapters.AdapterError(f"{adapter.path}: {module}: adapter is for another base model (lora_B "
                                    f"{b.shape} @ lora_A {a.shape} vs weight {tuple(base_reader.shape(name))})")
    for name, t in adapter.full.items():
      if name not in names:
        raise adapters.AdapterError(f"{adapter.path}: saved module tensor {name!r} is not a tensor of the "
                                    f"base model")
      if tuple(base_reader.shape(name)) != tuple(t.shape):
        raise adapters.AdapterError(f"{adapter.path}: {name} has shape {t.shape} but the base's is "
                                    f"{tuple(base_reader.shape(name))}; adapter for another base model?")

  def keys(self):
    return self._base.keys()

  def __contains__(self, name):
    return name in self._base

  def shape(self, name):
    return self._base.shape(name)

  def dtype(self, name):
    return self._base.dtype(name)

  def nbytes(self, name):
    return self._base.nbytes(name)

  def get(self, name):
    if name in self.adapter.full:
      return np.asarray(self.adapter.full[name]).astype(self._base.dtype(name))
    w = self._base.get(name)
    ab = self.adapter.lora.get(name[:-len(".weight")]) if name.endswith(".weight") else None
    if ab is None:
      return w
    a, b = ab
    delta = (b.astype(np.float32) @ a.astype(np.float32)) * np.float32(self.adapter.scale)
    return (w.astype(np.float32) + delta.astype(w.dtype).astype(np.float32)).astype(w.dtype)

  def items(self):
    for name in self.keys():
      yield name, self.get(name)

  def close(self):
    self._base.close()


class Input:
  """One input checkpoint: a tensor reader and (for HF folders) its config.json."""

  def __init__(self, path: str):
    self.path = path
    try:
      model, adapter = adapters.split_ref(path)
      p = pathlib.Path(model)
      if not p.exists():
        raise MergeError(f"input not found: {model}")
      ad = adapters.read_adapter(adapter) if adapter is not None else None
      self.reader = SafetensorsReader(p)
      if ad is not None:
        self.reader = MergedReader(self.reader, ad)
    except (adapters.AdapterError, SafetensorsError) as e:  # truncated, corrupt header, negative shape, ...
      raise MergeError(str(e)) from None
    self.folder = p if p.is_dir() else None
    cfg_file = p / "config.json" if p.is_dir() else None
    try:
      self.config = json.loads(cfg_file.read_text()) if cfg_file and cfg_file.exists() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise MergeError(f"{cfg_file}: not valid JSON ({e})") from None
    if self.config is not None and not isinstance(self.config, dict):
      raise MergeError(f"{cfg_file}: expected a JSON object, got {type(self.config).__name__}")

  @property
  def tied(self) -> bool:
    return bool(self.config and self.config.get("tie_word_embeddings", False))

  def has(self, name) -> bool:
    return name in self.reader or (name == TIED_HEAD and EMBED in self.reader)

  def shape(self, name):
    return self.reader.shape(self._alias(name))

  def dtype(self, name):
    return self.reader.dtype(self._alias(name))

  def get(self, name):
    return self.reader.get(self._alias(name))

  def _alias(self, name):
    return EMBED if name == TIED_HEAD and name not in self.reader else name


def check_compatible(inputs: List[Input], vocab_axes=None):
  """Same architecture, tensor names and shapes in every input (else one clear error). `vocab_axes`
  (name -> axis; vocabularies being aligned): those tensors may differ along that axis, and vocab_size."""
  ref = inputs[0]
  hint = "" if vocab_axes else " (vocabularies that differ merge with tokenizer_source: union or base)"
  configs = [i for i in inputs if i.config is not None]
  if configs and len(configs) != len(inputs):
    raise MergeError("cannot mix HF folders (with config.json) and raw safetensors inputs: "
                     + ", ".join(i.path for i in inputs if i.config is None))
  for other in configs[1:]:
    for key in _ARCH_KEYS:
      a, b = configs[0].config.get(key), other.config.get(key)
      if a != b and not (vocab_axes and key == "vocab_size"):
        raise MergeError(f"models have different architectures: {key} = {a!r} in {configs[0].path} "
                         f"but {b!r} in {other.path}" + (hint if key == "vocab_size" else ""))
  names = [n for n in ref.reader.keys()]
  ref_set = set(names) - {TIED_HEAD}
  for other in inputs[1:]:
    other_set = set(other.reader.keys()) - {TIED_HEAD}
    if other_set != ref_set:
      missing, extra = sorted(ref_set - other_set)[:3], sorted(other_set - ref_set)[:3]
      raise MergeError(f"models have different tensors: {other.path} lacks {missing} and has extra {extra} "
                       f"compared with {ref.path}")
    for n in names:
      a, b = list(ref.shape(n)), list(other.shape(n)) if other.has(n) else None
      if b is not None and vocab_axes and n in vocab_axes and len(a) == len(b):
        a[vocab_axes[n]] = b[vocab_axes[n]]
      if b is not None and a != b:
        raise MergeError(f"models have different shapes for {n}: {ref.shape(n)} in {ref.path} but "
                         f"{other.shape(n)} in {other.path}" + (hint if "embed" in n or "lm_head" in n else ""))


def plan_tensors(inputs: List[Input], out_tied: bool) -> List[str]:
  """Tensor names to write, in the reference input's order; a tied head is left out."""
  names = list(inputs[0].reader.keys())
  if TIED_HEAD not in names and any(TIED_HEAD in i.reader for i in inputs) and not out_tied:
    names.append(TIED_HEAD)
  if out_tied:
    names = [n for n in names if n != TIED_HEAD]
  return names


def num_layers(inputs: List[Input]) -> int:
  cfg = inputs[0].config
  if cfg and "num_hidden_layers" in cfg:
    return int(cfg["num_hidden_layers"])
  idx = [int(m.group(1)) for n in inputs[0].reader.keys() for m in [_LAYER_RE.search(n)] if m]
  return max(idx) + 1 if idx else 0


def tokenizer_input(inputs: List[Input]) -> Optional[Input]:
  """The input whose tokenizer files the output gets: the base (first input), else (with a warning)
  the first model that has them; None, with a warning, when no input has any (the merged folder
  then needs them copied in before `generate` or `evaluate` can use it)."""
  def has_tokenizer(i):
    return i.folder is not None and any((i.folder / f).is_file() for f in _TOKENIZER_FILES[:5])
  for i in inputs:
    if has_tokenizer(i):
      if i is not inputs[0]:
        print(f"warning: {inputs[0].path} has no tokenizer files; the merged folder gets {i.path}'s",
              file=sys.stderr, flush=True)
      return i
  print(f"warning: no input has tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...), so the merged "
        f"folder has none: copy the original model's tokenizer files into it before generate/evaluate",
        file=sys.stderr, flush=True)
  return None


def write_sidecars(spec, ref: Input, tmp: pathlib.Path, out_tied: bool, stats: dict,
                   tok: Optional[Input] = None, align=None):
  """config.json (dtype updated), the reference's generation config and `tok`'s tokenizer files, or the
  aligned tokenizer and vocab_size of `align` (an h3jax.merging.streaming.vocab.Alignment)."""
  if ref.config is not None:
    cfg = dict(ref.config, **(align.config_updates if align is not None else {}))
    dt = spec.out_dtype or spec.dtype
    if dt is not None:
      cfg["dtype"] = dt
      cfg.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  copies = [(ref, "generation_config.json")]
  if tok is not None and align is None:
    copies += [(tok, f) for f in _TOKENIZER_FILES]
  for src_input, fname in copies:
    src = src_input.folder / fname if src_input.folder is not None else None
    if src is not None and src.is_file():
      shutil.copy2(src, tmp / fname)
  if align is not None:
    align.save(tmp)
  if spec.chat_template:
    set_chat_template(tmp, spec.chat_template, inputs_of(spec))
  stats = {n: {k: (None if isinstance(v, float) and v != v else v) for k, v in s.items()}
           for n, s in stats.items()}  # NaN (undefined statistic) -> null: strict JSON
  (tmp / "h3jax_merge.json").write_text(json.dumps({
      "merge_method": spec.method, "base_model": spec.base_model, "models": list(spec.models),
      "flavour": spec.flavour, "seed": spec.seed, "dtype": spec.dtype, "out_dtype": spec.out_dtype,
      "tokenizer_source": spec.tokenizer_source, "vocab_aligned": align is not None,
      "tensor_stats": stats,
  }, indent=2) + "\n")


def inputs_of(spec) -> List[pathlib.Path]:
  """Folders of every input (base first), `MODEL+LORA` read as MODEL (as mergekit does for templates)."""
  return [pathlib.Path(adapters.split_ref(p)[0]) for p in spec.inputs]


def _template_of(folder: pathlib.Path):
  if (folder / "chat_template.jinja").is_file():
    return (folder / "chat_template.jinja").read_text()
  for name, key in (("tokenizer_config.json", "chat_template"), ("chat_template.json", "chat_template")):
    if (folder / name).is_file():
      t = json.loads((folder / name).read_text()).get(key)
      if isinstance(t, list):  # [{name, template}]: the default one
        t = next((d.get("template") for d in t if d.get("name") == "default"), None)
      if isinstance(t, dict):
        t = t.get("default")
      if t:
        return t
  return None


def set_chat_template(out: pathlib.Path, template: str, folders) -> None:
  """Writes `template` ('auto': the most common among the inputs' tokenizers, as mergekit does) as the
  output tokenizer's chat template (chat_template.jinja, which transformers prefers)."""
  if template == "auto":
    found = [t.strip() for t in (_template_of(f) for f in folders if f is not None and f.is_dir()) if t]
    if not found:
      return
    template = collections.Counter(found).most_common(1)[0][0]
  if not (out / "tokenizer_config.json").is_file():
    raise MergeError("chat_template is set but the output has no tokenizer (the base has no tokenizer files)")
  cfg = json.loads((out / "tokenizer_config.json").read_text())
  cfg.pop("chat_template", None)
  (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
  (out / "chat_template.json").unlink(missing_ok=True)
  (out / "chat_template.jinja").write_text(template)
