"""What a run trains: the model, its LoRA / trainable-leaf rules, and its data, per stage.

  stage "sft"     Stage A: one aligned expert from a base model (HF folder, or a
                  random tiny model). Paper setting: LoRA r=8, α=4, dropout 0.1
                  on gate/up/down of every layer, everything else frozen;
                  `train.trainable=("^layers/mlp/",)` with lora.enabled=False is
                  full-FFN fine-tuning.
  stage "fusion"  Stage B: `h3jax.fusion.build_moe(base, experts)` then fresh LoRA
                  on q/k/v/o and every expert's gate/up/down; the router is
                  trainable unless `train.router_trainable=False` (defect #4;
                  reference-code defects are numbered in docs/h3fusion.md).

Data comes from `h3jax.data`: records via `h3jax.data.pipeline.load_records`
(3H axis names, "mixture", or JSONL paths), the tokenizer via
`h3jax.data.tokenize.load_tokenizer` ("bytes" or an HF folder), batches via
`make_iterator` (templates alpaca | chat | plain, optional packing). The run's
`train` / `eval` are `BatchIterator`s; the loop checkpoints `train.state()`.

Everything is driven by the ml_collections config described in configs/*.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from h3jax.config import REMAT, ModelConfig, RopeConfig
from h3jax.data import pipeline as data_lib
from h3jax.data import tokenize as tok_lib
from h3jax.model import params as params_lib
from h3jax.train import lora, objective, optim

STAGES = ("sft", "fusion")
TARGET_SETS = {"ffn": lora.FFN_TARGETS, "attn": lora.ATTN_TARGETS}


@dataclasses.dataclass
class Run:
  cfg: ModelConfig
  params: dict
  labels: dict
  loss: objective.LossConfig
  tokenizer: Any
  train: data_lib.BatchIterator
  eval: Optional[data_lib.BatchIterator]
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
    if f.get("moe_config"):
      from h3jax.fusion import moe_config
      cfg, params, _, base_dir = moe_config.build_from_config(f.moe_config, seed=config.seed,
                                                              load_dtype=m.param_dtype)
      names = tuple(f.expert_names)[:cfg.num_experts]
      cfg = cfg.replace(moe_dispatch=f.dispatch, capacity_factor=float(f.capacity_factor),
                        expert_names=names if len(names) == cfg.num_experts else cfg.expert_names)
      return cfg, params, base_dir
    if len(f.expert_dirs) < 2:
      raise ValueError(f"stage 'fusion' needs fusion.expert_dirs with >= 2 experts, got {list(f.expert_dirs)}")
    prompts = hidden_router_prompts(config) if f.router_init == "hidden" else None
    cfg, params = fusion.build_moe(f.base_dir, list(f.expert_dirs), router_init=f.router_init,
                                   top_k=f.top_k, dispatch=f.dispatch, capacity_factor=f.capacity_factor,
                                   expert_names=list(f.expert_names) or None, seed=config.seed,
                                   delta_scale=f.delta_scale, alias_experts=f.alias_experts,
                                   attn_from=f.attn_from, dtype=m.param_dtype, hidden_prompts=prompts)
    return cfg, params, f.base_dir
  if m.hf_dir:
    from h3jax.hf.loader import load_model  # HF folder, h3jax checkpoint or adapter
    cfg, params = load_model(m.hf_dir, m.param_dtype)
    return cfg, params, m.hf_dir
  cfg = tiny_model_config(m.tiny)
  return cfg, params_lib.init_params(cfg, jax.random.key(config.seed), m.param_dtype), None


def hidden_router_prompts(config) -> list:
  """router_init="hidden": per expert, the first `fusion.hidden_prompts` training prompts of its data
  source (experts and data.sources in the same order), formatted with the training template, as token
  ids."""
  from h3jax.data import format as fmt
  d, f = config.data, config.fusion
  sources = list(d.sources)
  if len(sources) != len(f.expert_dirs):
    raise ValueError(f"router_init='hidden' takes each expert's prompts from its data source: "
                     f"{len(f.expert_dirs)} experts but data.sources={sources}")
  tokenizer = tok_lib.load_tokenizer(d.tokenizer or f.base_dir)
  out = []
  for src in sources:
    recs = data_lib.load_records(src, split="train", data_root=d.data_root or None)[:int(f.hidden_prompts)]
    out.append([tokenizer.encode(fmt.format_prompt(r, tokenizer, d.template),
                                 add_special_tokens=d.template != "chat") for r in recs])
  return out


def apply_lora(config, cfg: ModelConfig, params: dict):
  lc = config.lora
  if not lc.enabled:
    return cfg, params
  targets = []
  for t in lc.targets:
    targets += list(TARGET_SETS.get(t, (t,)))
  params = lora.add_lora(params, targets, lc.rank, jax.random.key(config.seed + 1))
  return lora.lora_model_config(cfg, lc.rank, lc.alpha, lc.dropout), params


TASK_LABELS = ("per_source", "cumulative")


def load_data_records(d) -> list:
  """Training records of a `data` ConfigDict, with task labels.

  Per source (axis name, "mixture" or JSONL path), the first `max_examples`
  records. Labels: `data.tasks[i]` for source i when given; else, with several
  sources, the source index (`task_labels="per_source"`) or the reference
  code's cumulative labels (defect #5); else each record's own `task`.
  "mixture" stands for the three axes (as `h3jax.data.pipeline.mixture_records`).
  """
  sources = list(d.sources)
  if "mixture" in sources:  # = data_lib.mixture_records: the three axes, max_examples per axis
    if sources != ["mixture"]:
      raise ValueError(f"data.sources: 'mixture' (the three 3H axes) must be the only source, got {sources}")
    sources = list(data_lib.AXES)
  if d.task_labels not in TASK_LABELS:
    raise ValueError(f"unknown data.task_labels {d.task_labels!r}; expected one of {TASK_LABELS}")
  if len(d.tasks) and len(d.tasks) != len(sources):
    raise ValueError(f"data.tasks has {len(d.tasks)} labels for the {len(sources)} sources {sources}; give "
                     "one per source or none")
  sizes, records = [], []
  for i, src in enumerate(sources):
    task = int(d.tasks[i]) if len(d.tasks) else None
    recs = data_lib.load_records(src, split="train", data_root=d.data_root or None, task=task)
    if d.max_examples:
      recs = recs[:d.max_examples]
    if not recs:
      raise ValueError(f"data source {src!r} gave no examples")
    sizes.append(len(recs))
    records += recs
  if len(sources) > 1 and not len(d.tasks):
    labels = (data_lib.cumulative_task_labels(sizes) if d.task_labels == "cumulative"
              else [i for i, n in enumerate(sizes) for _ in range(n)])
    records = [dict(r, task=t) for r, t in zip(records, labels)]
  return records


def make_iterator(d, records, tokenizer, batch_size: int, seed: int) -> data_lib.BatchIterator:
  """`make_iterator` with the `data` config's template, packing and target-suffix settings."""
  end_marker = None if d.end_marker == "auto" else d.end_marker
  return data_lib.make_iterator(records, tokenizer, batch_size=batch_size, max_len=d.seq_len, seed=seed,
                                template=d.template, pack=d.pack, end_marker=end_marker, add_eos=d.add_eos,
                                min_prompt_frac=d.min_prompt_frac)


def make_data(config, tokenizer, cfg: ModelConfig):
  """(train, eval or None) iterators; eval holds a seeded `eval_fraction` of the records."""
  d = config.data
  records = load_data_records(d)
  rng = np.random.default_rng(config.seed)
  n_eval = int(round(d.eval_fraction * len(records)))
  order = rng.permutation(len(records))
  if n_eval >= len(records):
    raise ValueError(f"data.eval_fraction={d.eval_fraction} leaves no training examples of {len(records)}")
  pick = lambda idx: [records[i] for i in np.sort(idx)]
  train = make_iterator(d, pick(order[n_eval:]), tokenizer, config.train.batch_size, config.seed)
  ev = make_iterator(d, pick(order[:n_eval]), tokenizer, config.train.batch_size, config.seed) if n_eval else None
  for it in (train, ev):
    top = max(int(np.max(e["input_ids_T"])) for e in it.examples) if it is not None else -1
    if top >= cfg.vocab_size:
      raise ValueError(f"token id {top} >= model vocab_size {cfg.vocab_size}: tokenizer and model do not match")
  return train, ev


REMAT_POLICIES = ("auto", *REMAT)  # "auto": resolved by resolve_remat


def resolve_remat(config, moe: bool = False) -> str:
  """config.model.remat, with "auto" as "dots" for a dense model whose base weights train, else "none": a LoRA
  step saves few activations, and an MoE's expert matmuls are batched dots, which "dots" recomputes
  (train/defaults.py has the numbers)."""
  remat = config.model.remat
  if remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {remat!r}")
  if remat == "auto":
    return "none" if config.lora.enabled or moe else "dots"
  return remat


def setup(config) -> Run:
  if config.stage not in STAGES:
    raise ValueError(f"unknown stage {config.stage!r}; expected one of {STAGES}")
  cfg, params, tok_src = load_base(config)
  cfg = cfg.replace(dtype=config.model.compute_dtype, remat=resolve_remat(config, moe=cfg.is_moe))
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
  tokenizer = tok_lib.load_tokenizer(tok_spec)
  train, ev = make_data(config, tokenizer, cfg)
  src = tok_spec if tok_spec != "bytes" else None
  return Run(cfg, params, labels, lc, tokenizer, train, ev, src)
