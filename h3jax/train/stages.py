"""What a run trains: the model, its LoRA / trainable-leaf rules, and its data, per stage.

  stage "sft"     Stage A: one aligned expert from a base model (HF folder, or a
                  random tiny model). Paper setting: LoRA r=8, α=4, dropout 0.1
                  on gate/up/down of every layer, everything else frozen;
                  `train.trainable=("^layers/mlp/",)` with lora.enabled=False is
                  full-FFN fine-tuning.
  stage "fusion"  Stage B: `h3jax.fusion.build_moe(base, experts)` then fresh LoRA
                  on q/k/v/o and every expert's gate/up/down; the router is
                  trainable unless `train.router_trainable=False` (defect #4).

Everything is driven by the ml_collections config described in configs/*.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from h3jax.config import ModelConfig, RopeConfig
from h3jax.model import params as params_lib
from h3jax.train import lora, objective, optim, sft_data

STAGES = ("sft", "fusion")
TARGET_SETS = {"ffn": lora.FFN_TARGETS, "attn": lora.ATTN_TARGETS}


@dataclasses.dataclass
class Run:
  cfg: ModelConfig
  params: dict
  labels: dict
  loss: objective.LossConfig
  tokenizer: Any
  train: sft_data.SFTBatches
  eval: Optional[sft_data.SFTBatches]
  tokenizer_source: Optional[str] = None


def tiny_model_config(c) -> ModelConfig:
  """ModelConfig from a `model.tiny` ConfigDict (random init, no files)."""
  c = dict(c)
  rope = RopeConfig(theta=float(c.pop("rope_theta", 10000.0)))
  return ModelConfig(rope=rope, **c)


def load_base(config):
  """(cfg, params, tokenizer_source) of the model a stage starts from."""
  m = config.model
  if config.stage == "fusion":
    from h3jax import fusion
    f = config.fusion
    if len(f.expert_dirs) < 2:
      raise ValueError(f"stage 'fusion' needs fusion.expert_dirs with >= 2 experts, got {list(f.expert_dirs)}")
    cfg, params = fusion.build_moe(f.base_dir, list(f.expert_dirs), router_init=f.router_init,
                                   top_k=f.top_k, dispatch=f.dispatch, capacity_factor=f.capacity_factor,
                                   expert_names=list(f.expert_names) or None, seed=config.seed,
                                   delta_scale=f.delta_scale, alias_experts=f.alias_experts,
                                   attn_from=f.attn_from, dtype=m.param_dtype)
    return cfg, params, f.base_dir
  if m.hf_dir:
    from h3jax.fusion import load_model  # HF folder or h3jax checkpoint
    cfg, params = load_model(m.hf_dir, m.param_dtype)
    return cfg, params, m.hf_dir
  cfg = tiny_model_config(m.tiny)
  return cfg, params_lib.init_params(cfg, jax.random.key(config.seed), m.param_dtype), None


def apply_lora(config, cfg: ModelConfig, params: dict):
  lc = config.lora
  if not lc.enabled:
    return cfg, params
  targets = []
  for t in lc.targets:
    targets += list(TARGET_SETS.get(t, (t,)))
  params = lora.add_lora(params, targets, lc.rank, jax.random.key(config.seed + 1))
  return lora.lora_model_config(cfg, lc.rank, lc.alpha, lc.dropout), params


def make_data(config, tokenizer, cfg: ModelConfig):
  d = config.data
  sizes, records = [], []
  for i, src in enumerate(d.sources):
    task = d.tasks[i] if len(d.tasks) else None
    recs = sft_data.load_records(src, task=task, data_root=d.data_root or None, split="train",
                                 max_examples=d.max_examples)
    sizes.append(len(recs))
    records += recs
  if len(d.sources) > 1 and not len(d.tasks):
    for r, t in zip(records, sft_data.mixed_task_labels(sizes, d.task_labels)):
      r["task"] = t
  kw = dict(end_marker=d.end_marker, add_eos=d.add_eos)
  arrays = sft_data.tokenize(records, tokenizer, d.seq_len, d.template, **kw)
  if int(arrays["input_ids_BT"].max()) >= cfg.vocab_size:
    raise ValueError(f"token id {int(arrays['input_ids_BT'].max())} >= model vocab_size {cfg.vocab_size}: "
                     "tokenizer and model do not match")
  rng = np.random.default_rng(config.seed)
  n_eval = int(round(d.eval_fraction * len(records)))
  order = rng.permutation(len(records))
  take = lambda idx: {k: v[idx] for k, v in arrays.items()}
  train_idx, eval_idx = np.sort(order[n_eval:]), np.sort(order[:n_eval])
  train = sft_data.SFTBatches(take(train_idx), config.train.batch_size, config.seed)
  ev = sft_data.SFTBatches(take(eval_idx), config.train.batch_size, config.seed) if n_eval else None
  return train, ev


def setup(config) -> Run:
  if config.stage not in STAGES:
    raise ValueError(f"unknown stage {config.stage!r}; expected one of {STAGES}")
  cfg, params, tok_src = load_base(config)
  cfg = cfg.replace(dtype=config.model.compute_dtype, remat=config.model.remat)
  if config.stage == "fusion" and config.fusion.dispatch:
    cfg = cfg.replace(moe_dispatch=config.fusion.dispatch)
  lc = objective.loss_config(config.loss, cfg)
  cfg, params = apply_lora(config, cfg, params)
  rules = optim.trainable_rules(lora=config.lora.enabled,
                                router=cfg.is_moe and config.train.router_trainable,
                                extra=tuple(config.train.trainable))
  labels = optim.param_labels(params, rules)
  tok_spec = config.data.tokenizer or tok_src
  if not tok_spec:
    raise ValueError("data.tokenizer is empty and the model has no folder to take one from")
  tokenizer = sft_data.make_tokenizer(tok_spec)
  train, ev = make_data(config, tokenizer, cfg)
  src = tok_spec if tok_spec != "bytes" else None
  return Run(cfg, params, labels, lc, tokenizer, train, ev, src)
