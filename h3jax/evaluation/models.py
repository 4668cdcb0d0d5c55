"""A model to evaluate: `[NAME=]DIR` -> {name, path, cfg, params, tokenizer}, and its fingerprint.

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

import jax
import numpy as np

from h3jax.hf import loader

# Every tokenizer file that can change the token ids or the chat template.
_TOKENIZER_ID_FILES = loader.TOKENIZER_FILES + ("merges.txt", "special_tokens_map.json", "added_tokens.json",
                                                "chat_template.jinja", "chat_template.json")


def load_entry(spec: str, dtype: str = "float32", ensemble_mode: str = "prob") -> dict:
  """`[NAME=]DIR` -> {name, path, cfg, params, tokenizer, tokenizer_dir}: a model as the evaluation sees it.

  DIR is any reference `h3jax.hf.loader.load_model` reads (an HF folder, a training workdir: its
  export DIR/hf if present, else its latest checkpoint; a PEFT LoRA adapter folder or BASE+ADAPTER),
  with the tokenizer `h3jax.hf.loader.tokenizer_dir` finds. `NAME=DIR1,DIR2,...` is the output
  ensemble of those models (h3jax.model.ensemble, combined by `ensemble_mode`), with DIR1's tokenizer.
  Params and compute are in `dtype`; non-finite weights are refused; an MoE is evaluated with the
  `sparse` dispatch.
  """
  name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
  if "," in path:
    return _load_ensemble(name, path.split(","), dtype, ensemble_mode)
  path = pathlib.Path(path)
  name = name or path.resolve().name
  if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
    raise ValueError(f"model name {name!r} must use only letters, digits, '.', '_' and '-' (it names "
                     f"output files); name the model with --model=NAME=DIR")
  tok_dir = loader.require_tokenizer_dir(path)  # before the weights are read
  cfg, params = loader.load_model(path, dtype)
  from h3jax.merging.tree import check_finite
  check_finite(params, f"refusing to evaluate {name} ({path})")  # e.g. a broken merge
  cfg = cfg.replace(dtype=dtype)
  if cfg.is_moe:  # dropless, reads only the chosen experts (a checkpoint keeps its training dispatch)
    cfg = cfg.replace(moe_dispatch="sparse")
  return {"name": name, "path": str(path), "cfg": cfg, "params": params,
          "tokenizer": loader.tokenizer_from_dir(tok_dir), "tokenizer_dir": str(tok_dir)}


def _load_ensemble(name: str, paths, dtype: str, mode: str) -> dict:
  from h3jax.model import ensemble
  if not name:
    raise ValueError(f"an ensemble of {len(paths)} models needs a name: --model=NAME=DIR1,DIR2,...")
  members = [load_entry(f"{name}={p}", dtype) for p in paths]
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
