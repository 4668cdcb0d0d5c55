"""LoRA extraction: (base, fine-tuned) HF folders -> a PEFT adapter, like `mergekit-extract-lora` 0.1.5.

For every nn.Linear weight W [out, in] of the family's key table (attention,
MLP, and an untied lm_head only with embed="lora"... see below), the delta
M - W is factored by a truncated SVD, U S Vh, at rank r = min(rank, out, in)
(or the module's entry of `rank_pattern`, a {regex: rank} table, first match):

  lora_A = sqrt(S_r) Vh_r  [r, in]     lora_B = U_r sqrt(S_r)  [out, r]

(mergekit's default --distribute-scale), so B @ A is the best rank-r
approximation of the delta and lora_alpha = r makes PEFT's scale 1. Tensors
that are not linear layers (norms) and the embeddings / lm_head go to
`modules_to_save` at full rank, as mergekit does without --embed-lora
(embed="save"); embed="skip" leaves them out (the adapter then keeps the
base's). Modules whose delta is exactly zero are still written (rank r,
zero factors), as mergekit does. Tensors are read one at a time; the output
appears atomically. With several ranks, PEFT's rank_pattern / alpha_pattern
carry them (alpha = rank per module, so the scale stays 1).
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from h3jax import rules as rules_lib
from h3jax.hf import adapters, st_io
from h3jax.hf.load import load_config

EMBED_MODES = ("save", "skip")


@jax.jit
def _svd(delta):
  return jnp.linalg.svd(delta.astype(jnp.float32), full_matrices=False)


def factor(delta: np.ndarray, rank: int):
  """(A [r, in], B [out, r]) with B @ A the best rank-r approximation of delta [out, in]."""
  u, s, vh = (np.asarray(x) for x in _svd(jnp.asarray(delta)))
  r = min(rank, s.shape[0])
  sq = np.sqrt(s[:r])
  return (sq[:, None] * vh[:r]).astype(np.float32), (u[:, :r] * sq[None, :]).astype(np.float32)


def _rank_for(module: str, rank: int, rank_pattern: Optional[Mapping[str, int]]) -> int:
  for pattern, r in (rank_pattern or {}).items():
    if rules_lib.matches("re:" + pattern, module):  # PEFT's rank_pattern keys are regexes
      return int(r)
  return rank


def extract_lora(base_dir, model_dir, out_dir, rank: int, *, rank_pattern: Optional[Mapping[str, int]] = None,
                 embed: str = "save", overwrite: bool = False) -> pathlib.Path:
  """Writes the PEFT adapter that takes `base_dir` to (a rank-limited) `model_dir`; returns its path."""
  from h3jax.hf.export import atomic_output_dir
  if rank < 1:
    raise adapters.AdapterError(f"rank must be >= 1, got {rank}")
  if embed not in EMBED_MODES:
    raise adapters.AdapterError(f"embed must be one of {EMBED_MODES}, got {embed!r}")
  for r in (rank_pattern or {}).values():
    if int(r) < 1:
      raise adapters.AdapterError(f"rank_pattern ranks must be >= 1, got {r}")
  base_cfg, _ = load_config(base_dir)
  model_cfg, _ = load_config(model_dir)
  for f in ("architecture", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "vocab_size", "tie_word_embeddings", "is_moe"):
    if getattr(base_cfg, f) != getattr(model_cfg, f):
      raise adapters.AdapterError(f"{model_dir} does not fine-tune {base_dir}: {f} = {getattr(model_cfg, f)!r} vs "
                                  f"{getattr(base_cfg, f)!r}")
  if base_cfg.is_moe:
    raise adapters.AdapterError("LoRA extraction from MoE models is not supported (experts are not nn.Linear "
                                "modules in transformers)")
  linear = adapters.linear_modules(base_cfg)
  embeds = {"model.embed_tokens.weight", "lm_head.weight"}
  out_dir = pathlib.Path(out_dir)
  with st_io.SafetensorsReader(base_dir) as br, st_io.SafetensorsReader(model_dir) as mr:
    names = [n for n in mr.keys() if not (base_cfg.tie_word_embeddings and n == "lm_head.weight")]
    for n in names:
      if n not in br or br.shape(n) != mr.shape(n):
        raise adapters.AdapterError(f"{n}: shape {mr.shape(n)} in {model_dir} but "
                                    f"{br.shape(n) if n in br else 'absent'} in {base_dir}")
    ranks, save = {}, []
    with atomic_output_dir(out_dir, overwrite) as tmp:
      writer = st_io.SafetensorsWriter(tmp, max_shard_size="1000GB")
      for n in sorted(names):
        module = n[:-len(".weight")] if n.endswith(".weight") else None
        if module in linear and n not in embeds:
          delta = mr.get(n).astype(np.float32) - br.get(n).astype(np.float32)
          a, b = factor(delta, _rank_for(module, rank, rank_pattern))
          dt = mr.dtype(n)
          writer.add(f"{adapters.PREFIX}{module}.lora_A.weight", a.astype(dt))
          writer.add(f"{adapters.PREFIX}{module}.lora_B.weight", b.astype(dt))
          ranks[module] = a.shape[0]
        elif n in embeds and embed == "skip":
          continue
        else:  # norms (and embeddings with embed="save"): full tensors from the fine-tuned model
          writer.add(adapters.PREFIX + n, mr.get(n))
          save.append(n.rsplit(".", 2)[-2])
      writer.close()
      (tmp / st_io.SINGLE_NAME).rename(tmp / adapters.WEIGHTS_NAME)
      r_max = max(ranks.values())
      pattern = {k: v for k, v in ranks.items() if v != r_max}
      config = {"base_model_name_or_path": str(base_dir), "peft_type": "LORA", "task_type": "CAUSAL_LM",
                "r": r_max, "lora_alpha": r_max, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                "target_modules": sorted({k.rsplit(".", 1)[-1] for k in ranks}),
                "modules_to_save": sorted(set(save)) or None, "use_rslora": False, "use_dora": False,
                "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True}
      (tmp / adapters.CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
  return out_dir
