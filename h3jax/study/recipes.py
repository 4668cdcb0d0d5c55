"""Training, merge and evaluation configs of each study stage, built from the study config.

Every recipe is `h3jax.train.defaults.default_config()` (or the evaluation's default config) with the
study's nested override dicts merged in, so `resolved(...)` of a stage is exactly what it ran and is
written next to its outputs.
"""

from __future__ import annotations

import copy

import ml_collections

from h3jax.study.defaults import AXES

# The study's axis scores (docs/study.md): the per-sample metrics the papers report.
STUDY_AXES = {"helpful": "helpful/win_rate_text_davinci_003", "harmless": "1-harmless/compliance_rate",
              "honest": "honest/truthful_informative"}


def merge_into(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """config with the nested dict `overrides` merged in (unknown keys are an error, as in a flag)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    _merge(out, overrides, "")
  return out


def _merge(node, overrides, prefix):
  for k, v in dict(overrides).items():
    if k not in node:
      raise ValueError(f"unknown config key {prefix}{k!r} in a study recipe")
    if isinstance(node[k], ml_collections.ConfigDict):
      _merge(node[k], v, f"{prefix}{k}.")
    else:
      node[k] = tuple(v) if isinstance(v, list) else v


def _base_train(sc) -> ml_collections.ConfigDict:
  from h3jax.train.defaults import default_config
  c = default_config()
  with c.unlocked():
    c.seed = sc.seed
    c.model.hf_dir = sc.base
    c.data.tokenizer = sc.tokenizer
    if "tiny" in sc and sc.tiny:
      c.model.tiny = merge_into(c.model.tiny, sc.tiny)
    c.export.enabled = True
  return merge_into(c, sc.stage_a)


def axis_data(sc) -> tuple:
  """The three axes' training-data specs, in AXES order."""
  specs = sc.get("axis_data") or {}
  return tuple(str(specs.get(a, a)) for a in AXES)


def expert_config(sc, axis: str) -> ml_collections.ConfigDict:
  """Stage A: LoRA SFT of the base on one axis' training split."""
  c = _base_train(sc)
  with c.unlocked():
    c.stage = "sft"
    c.data.sources = (axis_data(sc)[AXES.index(axis)],)
    c.data.tasks = (AXES.index(axis),)
    c.train.steps = int(sc.expert_steps[axis])
  return c


def mixture_config(sc) -> ml_collections.ConfigDict:
  """The data-mixture baseline: Stage A's recipe on the three training sets mixed, as many steps (hence
  examples) as the three experts together."""
  c = _base_train(sc)
  with c.unlocked():
    c.stage = "sft"
    c.data.sources = axis_data(sc)
    c.data.tasks = (0, 1, 2)
    c.train.steps = int(sc.mixture_steps or sum(int(sc.expert_steps[a]) for a in AXES))
  return c


def moe_config(sc, row_overrides: dict, expert_dirs) -> ml_collections.ConfigDict:
  """Stage B of one H3Fusion variant: the experts fused into a top-k MoE, then trained on the mixture."""
  c = _base_train(sc)
  with c.unlocked():
    c.stage = "fusion"
    c.fusion.base_dir = sc.base
    c.fusion.expert_dirs = tuple(str(d) for d in expert_dirs)
    c.fusion.expert_names = AXES
    c.data.sources = axis_data(sc)
    c.data.tasks = ()
    c.train.steps = int(sc.stage_b_steps)
  c = merge_into(c, _stage_b_defaults(sc))
  row = dict(row_overrides)
  steps = row.pop("steps", None)
  c = merge_into(c, row)
  if steps is not None:
    with c.unlocked():
      c.train.steps = int(steps)
  return c


def _stage_b_defaults(sc) -> dict:
  return {k: dict(v) for k, v in sc.stage_b.items()}


def gamma_sweep_rows(sc) -> dict:
  """{row name: overrides} of the γ sweep: γ1 (helpful expert) swept, the others at sc.gamma."""
  out = {}
  for g in sc.gamma_sweep:
    name = f"moe_gamma_{g:.0e}".replace("+", "").replace("-0", "-")
    out[name] = dict(loss=dict(gate_weight=sc.gate_weight, drift_weights=(float(g), sc.gamma, sc.gamma)))
  return out


def eval_config(sc, part: str = "eval") -> ml_collections.ConfigDict:
  """The study evaluation config (part "eval") or the validation config (part "validation")."""
  from h3jax.evaluation.runner import default_config
  c = default_config()
  e = sc.eval
  with c.unlocked():
    c.prompt_template = e.prompt_template
    c.mc_format = "template"
    c.batch_size = int(e.batch_size)
    c.router_prompts = int(e.router_prompts)
    c.generation.max_new_tokens = int(e.generation.max_new_tokens)
    # validation decodes as the evaluation does (only shorter), so grid choices carry over
    c.generation.repetition_penalty = float(e.generation.get("repetition_penalty", 1.0))
    c.generation.penalize_eos = bool(e.generation.get("penalize_eos", True))
    c.sample = ml_collections.ConfigDict(dict(e.sample))
    c.holdout = ml_collections.ConfigDict(dict(e.holdout))
    c.sample_seed = int(e.sample_seed)
    c.sample_part = part
    c.ensemble_mode = sc.ensemble_mode
    c.axis_metrics = ml_collections.ConfigDict(STUDY_AXES)
    if "judges" in sc:
      c.judges = merge_into(c.judges, sc.judges)
    if part == "validation":
      v = sc.validation
      c.sets = tuple(v.sets)
      c.generation.max_new_tokens = int(v.generation.max_new_tokens)
      c.router_prompts = 0
  return c
