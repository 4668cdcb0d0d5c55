"""Write a params tree as an HF folder that `transformers.AutoModelForCausalLM` loads.

Dense models export as their own architecture, MoE models as MixtralForCausalLM.
LoRA leaves are merged into their kernels first. Tensors stream to sharded
safetensors one HF tensor at a time (host memory: one params leaf), inside a
temporary sibling directory swapped into place only when complete (`h3jax.io_atomic`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from h3jax import io_atomic
from h3jax import progress as progress_lib
from h3jax.config import ModelConfig, resolve_dtype
from h3jax.hf import config_io, keymap, st_io
from h3jax.model import params as params_lib
from h3jax.model.lora import merge_lora
from h3jax.rules import path_str

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json")


def check_params(params: dict, cfg: ModelConfig):
  """Raises a ValueError naming the first leaf whose presence or shape disagrees with cfg."""
  want = dict(jax.tree_util.tree_flatten_with_path(params_lib.param_shapes(cfg),
                                                   is_leaf=lambda x: isinstance(x, tuple))[0])
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  fmt = path_str
  for p in sorted(set(want) | set(got), key=fmt):
    if p not in got:
      raise ValueError(f"params are missing {fmt(p)} (expected shape {want[p]})")
    if p not in want:
      raise ValueError(f"params have {fmt(p)}, which config {config_io.hf_architecture(cfg)} does not use")
    if tuple(got[p].shape) != tuple(want[p]):
      raise ValueError(f"params {fmt(p)} has shape {tuple(got[p].shape)}, config implies {want[p]}")


def atomic_output_dir(out_dir, overwrite: bool = False, inputs=()):
  """A temp dir next to `out_dir`, swapped in on success (`h3jax.io_atomic.output_dir`)."""
  return io_atomic.output_dir(out_dir, overwrite=overwrite, inputs=inputs)


def copy_tokenizer(source, dest):
  source = pathlib.Path(source)
  if not source.is_dir():
    raise FileNotFoundError(f"tokenizer source folder not found: {source}")
  copied = [f for f in TOKENIZER_FILES if (source / f).exists()]
  if not any(f.startswith("tokenizer") or f in ("vocab.json",) for f in copied):
    raise FileNotFoundError(f"{source} has no tokenizer files (looked for {TOKENIZER_FILES[:3]})")
  for f in copied:
    shutil.copy2(source / f, dest / f)
  return copied


def save_pretrained(params: dict, cfg: ModelConfig, out_dir, *, max_shard_size="5GB",
                    tokenizer_source=None, overwrite: bool = False, dtype: Optional[str] = None,
                    progress: bool = False, inputs=()) -> pathlib.Path:
  """Writes `params` as an HF folder; returns its path. `dtype`: tensor dtype written
  (default: the params' own dtype). A tied lm_head is not written. `inputs`: folders the
  params came from (and `tokenizer_source`), which `out_dir` must not be, hold or lie in."""
  io_atomic.check_not_overlapping(out_dir, (*inputs, tokenizer_source))
  params = merge_lora(params, cfg.lora_scale)
  check_params(params, cfg)
  leaf_dtype = jax.tree.leaves(params)[0].dtype
  dtype = dtype or {jnp.dtype(jnp.bfloat16): "bfloat16", jnp.dtype(jnp.float16): "float16"}.get(
      jnp.dtype(leaf_dtype), "float32")
  np_dtype = np.dtype(resolve_dtype(dtype))
  hf_cfg = config_io.model_config_to_hf(cfg, dtype=dtype)
  rows = keymap.rows(cfg)
  rows = progress_lib.bar(rows, desc=f"export {pathlib.Path(out_dir).name}", unit="leaf", enabled=progress)
  with atomic_output_dir(out_dir, overwrite, inputs=(*inputs, tokenizer_source)) as tmp:
    writer = st_io.SafetensorsWriter(tmp, max_shard_size=max_shard_size)
    for row in rows:
      leaf = params
      for k in row.path:
        leaf = leaf[k]
      host = np.asarray(jax.device_get(leaf))  # one params leaf on the host at a time
      for idx, name in keymap.expand(row, cfg):
        t = host[idx]
        writer.add(name, np.ascontiguousarray(np.swapaxes(t, -1, -2) if row.transpose else t).astype(np_dtype))
      del host
    writer.close()
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_cfg["eos_token_id"],
           "pad_token_id": cfg.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                           indent=2) + "\n")
    if tokenizer_source is not None:
      copy_tokenizer(tokenizer_source, tmp)
  logging.info("wrote %s (%s, %s)", out_dir, hf_cfg["architectures"][0], dtype)
  return pathlib.Path(out_dir)


def export_checkpoint(checkpoint_dir, out_dir, *, step: Optional[int] = None, tokenizer_source=None,
                      dtype: Optional[str] = None, max_shard_size="5GB", overwrite: bool = False,
                      format: str = "hf", base: Optional[str] = None) -> pathlib.Path:
  """A training run's Orbax checkpoint (default: its latest step) as an HF folder (`format="hf"`: LoRA
  merged, MoE as Mixtral) or a PEFT adapter folder (`format="peft"`: LoRA factors only, with `base`
  recorded as their base model; the run must have trained nothing else). Without `tokenizer_source`
  the one recorded in the checkpoint's extra state (if any) is copied. Every input check runs before
  anything is created."""
  from h3jax import checkpoint
  out = pathlib.Path(out_dir)
  io_atomic.check_not_overlapping(out, (checkpoint_dir, tokenizer_source))
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
  if not pathlib.Path(checkpoint_dir).is_dir():  # checked first: Orbax would create the folder
    raise FileNotFoundError(f"checkpoint folder not found: {checkpoint_dir} (pass the run's checkpoints/ "
                            f"folder, e.g. runs/NAME/checkpoints)")
  if tokenizer_source and not pathlib.Path(tokenizer_source).is_dir():
    raise FileNotFoundError(f"--tokenizer_source folder not found: {tokenizer_source}")
  if out.exists() and overwrite:
    io_atomic.check_replaceable(out)
  restored = checkpoint.load_checkpoint(checkpoint_dir, step)
  cfg = restored["config"]
  if not tokenizer_source:
    tokenizer_source = restored["extra"].get("tokenizer_source")
    needed = format != "peft" or not base  # a PEFT adapter names its base: --base, else this folder
    if needed and tokenizer_source and not pathlib.Path(tokenizer_source).is_dir():  # a run moved elsewhere
      flag = ("--base DIR (the base model)" if format == "peft"
              else "--tokenizer_source DIR (a folder with the tokenizer files)")
      raise FileNotFoundError(f"the checkpoint's tokenizer folder {tokenizer_source} (recorded when it was "
                              f"trained) is not here; pass {flag}")
  if format == "peft":
    from h3jax.hf import adapters
    base = base or tokenizer_source
    if base is not None and pathlib.Path(base, "config.json").is_file():  # nothing but LoRA may have changed
      from h3jax.hf.load import load_pretrained
      adapters.check_only_lora_trained(restored["params"], load_pretrained(base)[1], base)
    return adapters.save_adapter(cfg, restored["params"], out, base_model_name_or_path=base,
                                 overwrite=overwrite)
  if format != "hf":
    raise ValueError(f"unknown export format {format!r}; expected 'hf' or 'peft'")
  print(f"exporting step {restored['step']} of {checkpoint_dir} to {out}", file=sys.stderr, flush=True)
  return save_pretrained(restored["params"], cfg, out, max_shard_size=max_shard_size,
                         tokenizer_source=tokenizer_source, overwrite=overwrite, dtype=dtype,
                         progress=True, inputs=(checkpoint_dir,))
