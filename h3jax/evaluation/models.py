"""Loading a model to evaluate: `[NAME=]DIR` -> {name, path, cfg, params, tokenizer}, and its fingerprint.

The fingerprint (what the evaluation cache keys generations and MC log-probs
by, never the model's name) is a sha256 of the loaded weights' bytes, the
model config and the tokenizer files: two folders with the same name but
different weights never share answers, and a copied folder keeps its cache.
It costs one pass over the weights (1.6 s for SmolLM2-135M in float32 on a
shared 2-core CPU).
"""

from __future__ import annotations

import hashlib
import pathlib
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Every tokenizer file that can change the token ids or the chat template.
_TOKENIZER_ID_FILES = _TOKENIZER_FILES + ("merges.txt", "special_tokens_map.json", "added_tokens.json",
                                          "chat_template.jinja", "chat_template.json")


def _tokenizer_dir(path: pathlib.Path) -> Optional[pathlib.Path]:
  for d in (path, path / "tokenizer", path / "hf"):
    if any((d / f).is_file() for f in _TOKENIZER_FILES):
      return d
  return None


def load_model(spec: str, dtype: str = "float32", ensemble_mode: str = "prob") -> dict:
  """`[NAME=]DIR` -> {name, path, cfg, params, tokenizer}.

  DIR is an HF folder (config.json) or a training workdir: its export DIR/hf
  if present, else its latest checkpoint in DIR/checkpoints (or DIR) read with
  `h3jax.checkpoint.load_params`, with the tokenizer from DIR, DIR/tokenizer
  or DIR/hf. DIR may also be a PEFT LoRA adapter folder (on its recorded local
  base) or BASE+ADAPTER; the tokenizer is then the adapter's if it has one,
  else the base's. `NAME=DIR1,DIR2,...` is the output ensemble of those models
  (h3jax.model.ensemble, combined by `ensemble_mode`), with DIR1's tokenizer.
  An MoE is evaluated with the `sparse` dispatch.
  """
  name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
  if "," in path:
    return _load_ensemble(name, path.split(","), dtype, ensemble_mode)
  path = pathlib.Path(path)
  name = name or path.resolve().name
  if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
    raise ValueError(f"model name {name!r} must use only letters, digits, '.', '_' and '-' (it names "
                     f"output files); name the model with --model=NAME=DIR")
  from h3jax.hf import adapters
  base, adapter = adapters.split_ref(str(path))
  if adapter is not None:  # a PEFT adapter: its LoRA leaves stay unmerged (cfg.lora_scale)
    tok_dir = _tokenizer_dir(pathlib.Path(adapter)) or _tokenizer_dir(pathlib.Path(base))
    if tok_dir is None:
      raise ValueError(f"neither adapter {adapter} nor base {base} has tokenizer files")
    cfg, params = adapters.load_with_adapter(base, adapter, dtype=dtype)
    return {"name": name, "path": str(path), "cfg": cfg.replace(dtype=dtype), "params": params,
            "tokenizer": _load_tokenizer(tok_dir), "tokenizer_dir": str(tok_dir)}
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
  from h3jax.merging.tree import check_finite
  check_finite(params, f"refusing to evaluate {name} ({path})")  # e.g. a broken merge
  cfg = cfg.replace(dtype=dtype)
  if cfg.is_moe:  # dropless, reads only the chosen experts (a checkpoint keeps its training dispatch)
    cfg = cfg.replace(moe_dispatch="sparse")
  return {"name": name, "path": str(path), "cfg": cfg, "params": params, "tokenizer": _load_tokenizer(tok_dir),
          "tokenizer_dir": str(tok_dir)}


def _load_tokenizer(tok_dir):
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))
  except Exception as e:  # transformers raises many types here
    raise ValueError(f"{tok_dir}: tokenizer files could not be loaded ({type(e).__name__}: {e})") from e


def _load_ensemble(name: str, paths, dtype: str, mode: str) -> dict:
  from h3jax.model import ensemble
  if not name:
    raise ValueError(f"an ensemble of {len(paths)} models needs a name: --model=NAME=DIR1,DIR2,...")
  members = [load_model(f"{name}={p}", dtype) for p in paths]
  cfgs = {m["cfg"].replace(eos_token_id=(), expert_names=()) for m in members}
  if len(cfgs) != 1:
    raise ValueError(f"ensemble {name!r}: the members {paths} have different architectures")
  if any(m["tokenizer"].get_vocab() != members[0]["tokenizer"].get_vocab() for m in members[1:]):
    raise ValueError(f"ensemble {name!r}: the members {paths} have different vocabularies")
  params = ensemble.stack_members([m.pop("params") for m in members])
  cfg = ensemble.ensemble_config(members[0]["cfg"], len(members), mode)
  return {"name": name, "path": ",".join(str(p) for p in paths), "cfg": cfg, "params": params,
          "tokenizer": members[0]["tokenizer"], "tokenizer_dir": members[0]["tokenizer_dir"]}


def fingerprint(model: dict) -> str:
  """sha256 hex of (cfg, every weight's path, dtype, shape and bytes, tokenizer files); memoized in
  model["fingerprint"]. A model dict without "tokenizer_dir" (tests) hashes the tokenizer's type."""
  if model.get("fingerprint"):
    return model["fingerprint"]
  h = hashlib.sha256(repr(model["cfg"]).encode())
  for kp, leaf in jax.tree_util.tree_flatten_with_path(model["params"])[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(kp)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
  tok_dir = model.get("tokenizer_dir")
  if tok_dir:
    for f in _TOKENIZER_ID_FILES:
      if (pathlib.Path(tok_dir) / f).is_file():
        h.update(f"{f}|".encode() + (pathlib.Path(tok_dir) / f).read_bytes())
  else:
    h.update(type(model["tokenizer"]).__qualname__.encode())
  model["fingerprint"] = h.hexdigest()
  return model["fingerprint"]
