"""Loading a model to evaluate: `[NAME=]DIR` -> {name, path, cfg, params, tokenizer}."""

from __future__ import annotations

import pathlib
import re
from typing import Optional

import jax
import jax.numpy as jnp

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer_dir(path: pathlib.Path) -> Optional[pathlib.Path]:
  for d in (path, path / "tokenizer", path / "hf"):
    if any((d / f).is_file() for f in _TOKENIZER_FILES):
      return d
  return None


def load_model(spec: str, dtype: str = "float32") -> dict:
  """`[NAME=]DIR` -> {name, path, cfg, params, tokenizer}.

  DIR is an HF folder (config.json) or a training workdir: its export DIR/hf
  if present, else its latest checkpoint in DIR/checkpoints (or DIR) read with
  `h3jax.checkpoint.load_params`, with the tokenizer from DIR, DIR/tokenizer
  or DIR/hf. An MoE is evaluated with the `sparse` dispatch.
  """
  name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
  path = pathlib.Path(path)
  name = name or path.resolve().name
  if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
    raise ValueError(f"model name {name!r} must use only letters, digits, '.', '_' and '-' (it names "
                     f"output files); name the model with --model=NAME=DIR")
  if not path.is_dir():
    raise FileNotFoundError(f"model folder not found: {path}")
  tok_dir = _tokenizer_dir(path)
  if tok_dir is None:
    raise ValueError(f"model folder {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)} in "
                     f"{path}, {path}/tokenizer or {path}/hf); copy the base model's tokenizer files "
                     f"there or export with --tokenizer_source")
  hf_dir = next((d for d in (path, path / "hf") if (d / "config.json").is_file()), None)
  if hf_dir is not None:  # an HF folder, or a workdir with its export in hf/
    from h3jax.hf.load import load_pretrained
    cfg, params = load_pretrained(str(hf_dir), dtype=dtype)
  else:  # a workdir's latest Orbax checkpoint
    from h3jax.checkpoint import load_params
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    cfg, params = load_params(str(ckpt_dir))
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  import transformers
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
  except Exception as e:  # transformers raises many types here
    raise ValueError(f"{tok_dir}: tokenizer files could not be loaded ({type(e).__name__}: {e})") from e
  cfg = cfg.replace(dtype=dtype)
  if cfg.is_moe:  # dropless, reads only the chosen experts (a checkpoint keeps its training dispatch)
    cfg = cfg.replace(moe_dispatch="sparse")
  return {"name": name, "path": str(path), "cfg": cfg, "params": params, "tokenizer": tokenizer}
