"""The 3H evaluation pipeline: load models, generate (cached), score, write results and plots.

  results = evaluate(config, ["base=artifacts/smollm2", "runs/fused"], out_dir, limit=8)

For each model and eval set: format prompts with config.prompt_template (the
paper's Alpaca template by default, stopping at "###" as in "###END"; or the
tokenizer's chat template), generate the missing responses in fixed-size
batches (`infer`) and append them to `out_dir/cache/<model>.jsonl` after every
batch (keyed by the model's fingerprint, not its name: `models.fingerprint`),
score with the judges (answers cached there too; `scoring`), and write into
out_dir (temp file + rename): results.json, results.md,
samples_<model>.jsonl, and the plots of `report`. An interrupted run resumes
from the cache; a finished run re-scores only. results.json's timing holds
this run's wall seconds per stage and, under "compute", the wall and CPU
seconds and item counts per stage summed over every session that filled the
cache (CPU seconds are not inflated by other jobs or a paused process).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from h3jax import io_atomic
from h3jax.evaluation import cache as cache_lib
from h3jax.evaluation import report
from h3jax.evaluation import sets as eval_data
from h3jax.evaluation.infer import generation_settings, model_inputs, prompt_template, router_usage
from h3jax.evaluation.models import fingerprint, load_entry
from h3jax.evaluation.scoring import _judge, axis_scores, generate_shard, score_model
from h3jax.merging.tree import check_finite

__all__ = ["default_config", "evaluate", "compare", "load_entry", "load_judges", "judge_cards",
           "prompt_template", "score_model", "axis_scores"]


# ----------------------------------------------------------------------------- driver

def default_config():
  """The evaluation settings every configs/eval_*.py starts from (full run, greedy)."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.data_root = ""  # "" -> $H3JAX_DATA_ROOT, else the HF hub
  c.sets = eval_data.ALL_SETS
  c.limit = 0  # items per set; 0 = all
  c.helpful_subset = "full"  # full (433 eval instructions) | paper (idx 0..49)
  c.references = ("text_davinci_003", "gpt4_1106_preview")
  c.drop_trained_advbench = True
  c.prompt_template = "alpaca"  # alpaca (the paper's) | chat (the tokenizer's) | plain | auto
  c.mc_format = "template"  # template (c.prompt_template, as generation) | qa (TruthfulQA primer)
  c.dtype = "float32"
  c.batch_size = 16  # generation, MC and router rows per forward (padded)
  c.threshold = 0.5  # judge probability -> boolean
  c.router_prompts = 64  # prompts per axis for MoE router usage (0 = off)
  c.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0, seed=0, system="", stop_strings=(),
      repetition_penalty=1.0, penalize_eos=True))
  # judges.load_judges fields: kind local | http | none; dir "" = $H3JAX_JUDGES_DIR or artifacts/judges;
  # missing local judges are rebuilt from the data root.
  c.judges = ml_collections.ConfigDict(dict(kind="local", dir="", build_if_missing=True, url="", model=""))
  c.axis_metrics = ml_collections.ConfigDict({
      "helpful": "helpful/lc_win_rate_text_davinci_003",
      "harmless": "1-harmless/compliance_rate",
      "honest": "honest/mc2"})
  return c


def load_judges(config):
  """The configured judges (None when config.judges.kind == 'none')."""
  if config.judges.kind == "none":
    return None
  from h3jax.evaluation import judges as judges_lib
  cfg = {k: v for k, v in config.judges.items() if v not in ("", None)}
  cfg.setdefault("data_root", config.data_root or None)
  return judges_lib.load_judges(cfg)


def judge_cards(judges) -> dict:
  """Each judge's held-out agreement and baselines, as its card reports them."""
  out = {}
  for name in ("refusal", "truth", "info", "pairwise"):
    j = _judge(judges, name)
    if j is not None:
      out[name] = {"type": type(j).__name__, "metrics": getattr(j, "metrics", None)}
  return out


def open_cache(out_dir, model: dict) -> cache_lib.Cache:
  """The model's cache file out_dir/cache/<name>.jsonl. Its generation and MC rows are keyed by the
  model's fingerprint, so another model of the same name (or a cache from before fingerprints) adds rows
  instead of reusing answers."""
  store = cache_lib.Cache(pathlib.Path(out_dir) / "cache" / f"{model['name']}.jsonl")
  if store.legacy:
    print(f"warning: {store.path}: {store.legacy} generation/MC rows were keyed by model name (older "
          f"h3jax) and are not reused; delete the file to drop them", file=sys.stderr, flush=True)
  return store


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
  """'i/n' -> (i, n) with 0 <= i < n; None for None or ''."""
  if not text:
    return None
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    i, n = -1, 0
  if not 0 <= i < n:
    raise ValueError(f"shard must be 'i/n' with 0 <= i < n (e.g. 0/2), got {text!r}")
  return i, n


def generate_shards(config, model_specs: Sequence[str], out_dir, shard: Tuple[int, int], *,
                    limit: Optional[int] = None, progress: bool = True) -> dict:
  """One worker of a multi-process run: each model's missing generations of part i of n, into the
  shared cache (no MC, no judges, no results). XLA:CPU decodes on about one core, so n workers at
  once use n cores; the unsharded command then scores everything from the cache."""
  if not model_specs:
    raise ValueError("no models to evaluate: pass --model=DIR (repeat to compare)")
  sets = eval_data.load_eval_sets(config, limit=config.limit if limit is None else limit)
  done = {}
  for spec in model_specs:
    model = load_entry(spec, config.dtype, config.get("ensemble_mode", "prob"))
    store = open_cache(out_dir, model)
    done[model["name"]] = generate_shard(model, sets, config, store, shard, progress=progress)
    del model
  return done


def evaluate(config, model_specs: Sequence[str], out_dir, *, limit: Optional[int] = None, judges=None,
             models: Optional[List[dict]] = None, progress: bool = True) -> dict:
  """Evaluates each model; writes results.json, results.md, samples and plots into out_dir.

  `models` (already loaded dicts) replaces `model_specs` loading, for tests.
  `judges` overrides `load_judges(config)`.
  """
  specs = models if models is not None else list(model_specs)
  if not specs:
    raise ValueError("no models to evaluate: pass --model=DIR (repeat to compare)")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  limit = config.limit if limit is None else limit
  t_start = time.time()
  sets = eval_data.load_eval_sets(config, limit=limit)
  if judges is None:
    judges = load_judges(config)
  results = {"settings": {"limit": limit, "sets": {k: len(v) for k, v in sets.items()},
                          "prompt_template": config.prompt_template, "mc_format": config.mc_format,
                          "generation": dict(config.generation), "threshold": config.threshold,
                          "judges": config.judges.kind,
                          "sample": {k: config.get(k) if not hasattr(config.get(k), "to_dict") else
                                     config.get(k).to_dict()
                                     for k in ("sample", "holdout", "sample_seed", "sample_part") if k in config}},
             "models": {}, "timing": {}}
  results["judges"] = judge_cards(judges)
  for spec in specs:
    t0 = time.time()
    model = spec if isinstance(spec, dict) else load_entry(spec, config.dtype, config.get("ensemble_mode", "prob"))
    if isinstance(spec, dict):
      check_finite(model["params"], f"refusing to evaluate {model['name']}")
    if model["name"] in results["models"]:
      raise ValueError(f"two models are named {model['name']!r}; name them with --model=NAME=DIR")
    store = open_cache(out_dir, model)
    metrics, samples, skipped, timings = score_model(model, sets, config, judges, store, progress=progress)
    entry = {"path": model.get("path"), "fingerprint": fingerprint(model), "metrics": metrics,
             "skipped": skipped, "axes": axis_scores(metrics, dict(config.axis_metrics))}
    if model["cfg"].is_moe and config.router_prompts > 0:
      usage = {}
      for axis, set_names in eval_data.AXIS_SETS.items():
        prompts = [it["prompt"] for n in set_names for it in sets.get(n, []) if n != "truthfulqa_mc"]
        prompts = prompts[:config.router_prompts]
        if prompts:
          template = prompt_template(config, model["tokenizer"])
          texts = model_inputs(model["tokenizer"], prompts, generation_settings(config, template))
          usage[axis] = router_usage(model, texts, int(config.batch_size))["mean_prob"]
      entry["router_usage"] = usage
      entry["expert_names"] = list(model["cfg"].expert_names)
    timings["total"] = round(time.time() - t0, 2)
    timings["compute"] = store.times()  # every session's compute seconds per stage
    results["timing"][model["name"]] = timings
    results["models"][model["name"]] = entry
    io_atomic.write_text(out_dir / f"samples_{model['name']}.jsonl",
                  "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    del model
  results["timing"]["wall_s"] = round(time.time() - t_start, 2)
  table = report.markdown_table(results)
  with tempfile.TemporaryDirectory(dir=out_dir, prefix=".plots.") as tmp:
    results["plots"] = report.write_plots(results, tmp)
    for f in results["plots"]:
      os.replace(pathlib.Path(tmp) / f, out_dir / f)
  io_atomic.write_text(out_dir / "results.md", table)
  io_atomic.write_text(out_dir / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
  return results


def compare(models: Dict[str, str], out_dir, *, limit: Optional[int] = 8, config=None, judges=None) -> dict:
  """Pipeline entry point: evaluate {name: dir} (base, experts, fused), print the table, write plots."""
  config = default_config() if config is None else config
  results = evaluate(config, [f"{n}={p}" for n, p in models.items()], out_dir, limit=limit, judges=judges)
  print(report.markdown_table(results))
  return results
