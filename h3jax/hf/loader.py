"""One loader for every model reference: `load_model(ref, dtype) -> (cfg, params)` and its tokenizer.

A reference is
  * an HF folder (config.json + safetensors),
  * an h3jax Orbax checkpoint directory, or a training workdir: its export `hf/` if present, else
    its `checkpoints/`,
  * a PEFT LoRA adapter folder (put onto its recorded local base, or onto `base`) or `BASE+ADAPTER`:
    the adapter's factors stay LoRA leaves (cfg.lora_scale = its alpha / r).
Fusion, mergekit-moe builds, training, generation and the evaluation all load through here.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Tuple

from h3jax.config import ModelConfig

# Files that make a folder hold a tokenizer (transformers reads the rest next to them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(ref, dtype: Optional[str] = None, *, base=None) -> Tuple[ModelConfig, Any]:
  """(cfg, params) of a model reference (module docstring); params cast to `dtype` if given.

  An HF folder's cfg.dtype follows `dtype` (h3jax.hf.load.load_pretrained); a checkpoint keeps the
  config it was saved with. Callers that compute in `dtype` set `cfg.replace(dtype=...)` themselves.
  """
  from h3jax.hf import adapters
  model, adapter = adapters.split_ref(str(ref), default_base=base)
  if adapter is not None:
    return adapters.load_with_adapter(model, adapter, dtype)
  path = pathlib.Path(ref)
  if not path.is_dir():
    raise FileNotFoundError(f"model folder not found: {path}")
  hf_dir = hf_folder(path)
  if hf_dir is not None:
    from h3jax.hf.load import load_pretrained
    return load_pretrained(hf_dir, dtype=dtype)
  from h3jax.checkpoint import load_params
  return load_params(path / "checkpoints" if (path / "checkpoints").is_dir() else path, dtype=dtype)


def hf_folder(path) -> Optional[pathlib.Path]:
  """The HF folder of `path`: itself, or a training workdir's export `path/hf`; None for a checkpoint."""
  path = pathlib.Path(path)
  return next((d for d in (path, path / "hf") if (d / "config.json").is_file()), None)


def tokenizer_dir(ref) -> Optional[pathlib.Path]:
  """The folder holding a reference's tokenizer files: the folder itself, its `tokenizer/` or `hf/`;
  for an adapter the adapter's, else its base's. None if there is none."""
  from h3jax.hf import adapters
  base, adapter = adapters.split_ref(str(ref))
  if adapter is not None:
    return _find_tokenizer(pathlib.Path(adapter)) or _find_tokenizer(pathlib.Path(base))
  return _find_tokenizer(pathlib.Path(ref))


def _find_tokenizer(path: pathlib.Path) -> Optional[pathlib.Path]:
  for d in (path, path / "tokenizer", path / "hf"):
    if any((d / f).is_file() for f in TOKENIZER_FILES):
      return d
  return None


def require_tokenizer_dir(ref) -> pathlib.Path:
  """`tokenizer_dir(ref)`, or one clear error (checked before any weights are read)."""
  from h3jax.hf import adapters
  base, adapter = adapters.split_ref(str(ref))
  if adapter is not None:
    tok_dir = tokenizer_dir(ref)
    if tok_dir is None:
      raise ValueError(f"neither adapter {adapter} nor base {base} has tokenizer files")
    return tok_dir
  path = pathlib.Path(ref)
  if not path.is_dir():
    raise FileNotFoundError(f"model folder not found: {path}")
  tok_dir = _find_tokenizer(path)
  if tok_dir is None:
    raise ValueError(f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)} in "
                     f"{path}, {path}/tokenizer or {path}/hf); copy the base model's tokenizer files "
                     f"there or export with --tokenizer_source")
  return tok_dir


def load_tokenizer(ref):
  """The transformers tokenizer of a model reference (see `tokenizer_dir`); one clear error if none loads."""
  return tokenizer_from_dir(require_tokenizer_dir(ref))


def tokenizer_from_dir(tok_dir):
  """AutoTokenizer of a folder that holds tokenizer files, with one clear error."""
  from h3jax.data.tokenize import auto_tokenizer
  try:
    return auto_tokenizer(tok_dir)
  except Exception as e:  # transformers raises many types here
    raise ValueError(f"{tok_dir}: tokenizer files could not be loaded ({type(e).__name__}: {e})") from e
