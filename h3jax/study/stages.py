"""What each kind of study stage does. Every function writes only under its stage folder (or a model
folder it owns, written to a temp dir and renamed) and is safe to re-run after a kill: training resumes
from its checkpoints, generation from its cache, and a merge or selection is redone from scratch."""

from __future__ import annotations

import json
import pathlib
import shutil

from h3jax import io_atomic
from h3jax.study import plan, recipes
from h3jax.study.defaults import AXES


def _write_json(path: pathlib.Path, obj) -> None:
  io_atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def expert_dirs(workdir) -> list:
  return [str(pathlib.Path(workdir) / "train" / f"expert_{a}" / "checkpoints") for a in AXES]


def train_recipe(sc, workdir, row: str):
  if row.startswith("expert_"):
    return recipes.expert_config(sc, row[len("expert_"):])
  if row == "mixture_sft":
    return recipes.mixture_config(sc)
  return recipes.moe_config(sc, plan.moe_rows(sc)[row], expert_dirs(workdir))


def run_train(sc, workdir, stage: plan.Stage) -> dict:
  """Stage A / mixture SFT / Stage B: h3jax.train's loop (resumes from checkpoints), then the HF export."""
  from h3jax.train import loop
  row = stage.arg["row"]
  config = train_recipe(sc, workdir, row)
  out_dir = pathlib.Path(workdir) / stage.name
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "recipe.json").write_text(config.to_json_best_effort(indent=1) + "\n")
  if config.train.steps == 0:  # moe_untrained: the fused MoE as built, no Stage B
    return _export_untrained(config, out_dir)
  with config.unlocked():
    config.train.progress = sc.get("progress", True)
  summary = loop.train_and_evaluate(config, out_dir)
  return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}


def _export_untrained(config, out_dir: pathlib.Path) -> dict:
  from h3jax.hf.export import save_pretrained
  from h3jax.train import stages as train_stages
  cfg, params, tok_src = train_stages.load_base(config)
  save_pretrained(params, cfg.replace(moe_dispatch="dense"), out_dir / "hf", overwrite=True,
                  tokenizer_source=config.data.tokenizer or tok_src)
  return {"steps": 0}


def run_merge(sc, workdir, stage: plan.Stage) -> dict:
  """One grid point of a merge row: the three experts' task vectors w.r.t. the base, merged in memory
  (h3jax.merging), checked finite, written as an HF folder."""
  import time
  import jax
  import numpy as np
  import h3jax
  from h3jax import checkpoint, merging
  from h3jax.model.lora import merge_lora
  row, point = stage.arg["row"], stage.arg["point"]
  spec = sc.merges[row]
  hp = dict(spec.grid[point])
  cfg, base = h3jax.load_pretrained(sc.base)
  experts = []
  for d in expert_dirs(workdir):
    ecfg, p = checkpoint.load_params(d)
    experts.append(merge_lora(p, ecfg.lora_scale))
  t0 = time.perf_counter()
  merged = merging.get_method(spec.method)(base, experts, **hp)
  merged = jax.tree.map(np.asarray, merged)
  seconds = time.perf_counter() - t0
  bad = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(merged)
         if not np.all(np.isfinite(v))]
  if bad:
    raise FloatingPointError(f"{row} ({spec.method} {hp}): non-finite merged tensors {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''}")
  out = pathlib.Path(workdir) / stage.name
  out.mkdir(parents=True, exist_ok=True)
  h3jax.save_pretrained(merged, cfg, out / "model", overwrite=True, tokenizer_source=sc.tokenizer or sc.base)
  return {"method": spec.method, "hparams": hp, "merge_seconds": round(seconds, 2)}


def _evaluate(sc, workdir, row: str, spec_dir: str, out: pathlib.Path, part: str, shard=None) -> dict:
  from h3jax.evaluation import runner
  config = recipes.eval_config(sc, part)
  spec = f"{row}={spec_dir}"
  if shard is not None:
    runner.generate_shards(config, [spec], out, shard, progress=sc.get("progress", True))
    return {}
  res = runner.evaluate(config, [spec], out, progress=sc.get("progress", True))
  return {"axes": res["models"][row]["axes"]}


def row_model(sc, workdir, row: str) -> str:
  """The folder (or comma-separated folders of an ensemble) evaluated for a row."""
  if row == "base":
    return str(sc.base)
  if row == "ensemble_logits":
    return ",".join(str(pathlib.Path(workdir) / "train" / f"expert_{a}" / "hf") for a in AXES)
  choice = ""
  if row.startswith("merge_"):
    choice = json.loads((pathlib.Path(workdir) / "select" / row / "DONE.json").read_text())["result"]["choice"]
  return plan.model_dir(workdir, row, choice)


def run_val(sc, workdir, stage: plan.Stage) -> dict:
  """A merge grid point (val/<row>/g<i>) or a γ sweep point (val/<row>) on the validation items."""
  row, point = stage.arg["row"], stage.arg.get("point")
  out = pathlib.Path(workdir) / stage.name
  if point is None:
    return _evaluate(sc, workdir, row, plan.model_dir(workdir, row), out, "validation")
  return _evaluate(sc, workdir, f"{row}-g{point}", plan.model_dir(workdir, row, f"g{point}"), out, "validation")


def validation_score(axes: dict) -> float:
  """The selection metric: the mean of the three axis scores (each in [0, 1], higher better)."""
  vals = [axes.get(a) for a in AXES]
  return float("nan") if any(v is None for v in vals) else sum(vals) / len(vals)


def run_select(sc, workdir, stage: plan.Stage) -> dict:
  row = stage.arg["row"]
  grid = list(sc.merges[row].grid)
  if len(grid) == 1:
    return {"choice": "g0", "grid": [dict(grid[0])], "scores": None}
  scores = []
  for i in range(len(grid)):
    done = json.loads((pathlib.Path(workdir) / "val" / row / f"g{i}" / "DONE.json").read_text())
    scores.append({"point": f"g{i}", "hparams": dict(grid[i]), "axes": done["result"]["axes"],
                   "score": validation_score(done["result"]["axes"])})
  best = max(scores, key=lambda s: (s["score"] == s["score"], s["score"]))  # NaN last
  return {"choice": best["point"], "hparams": best["hparams"], "grid": scores,
          "metric": "mean of the validation axis scores"}


def run_gen(sc, workdir, stage: plan.Stage) -> dict:
  row = stage.arg["row"]
  out = pathlib.Path(workdir) / "eval" / row
  return _evaluate(sc, workdir, row, row_model(sc, workdir, row), out, "eval", shard=stage.arg["shard"])


def run_score(sc, workdir, stage: plan.Stage) -> dict:
  row = stage.arg["row"]
  out = pathlib.Path(workdir) / "eval" / row
  return _evaluate(sc, workdir, row, row_model(sc, workdir, row), out, "eval")


def run_analysis(sc, workdir, stage: plan.Stage) -> dict:
  from h3jax.study import analysis
  return analysis.write(sc, workdir)


def run_base(sc, workdir, stage: plan.Stage) -> dict:
  """A random tiny Llama (sc.tiny_base sizes) with the tokenizer of sc.tokenizer, as an HF folder."""
  import jax
  import h3jax
  from h3jax.data import tokenize as tok_lib
  from h3jax.model import params as params_lib
  from h3jax.train import stages as train_stages
  tok = tok_lib.load_tokenizer(sc.tokenizer)
  t = dict(sc.tiny_base)
  t.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok_lib.pad_id(tok),
           eos_token_id=(int(tok.eos_token_id),))
  cfg = train_stages.tiny_model_config(t)
  params = params_lib.init_params(cfg, jax.random.key(sc.seed), "float32", std=float(sc.get("tiny_std", 0.02)))
  h3jax.save_pretrained(params, cfg, pathlib.Path(sc.base), overwrite=True, tokenizer_source=sc.tokenizer)
  return {"params": int(sum(x.size for x in jax.tree.leaves(params)))}


RUNNERS = {"base": run_base, "train": run_train, "merge": run_merge, "val": run_val, "select": run_select,
           "gen": run_gen, "score": run_score, "analysis": run_analysis}


def clear(workdir, stage: plan.Stage) -> None:
  """Remove a stage's non-resumable partial output before it is redone (merges are redone whole)."""
  if stage.kind == "merge":
    shutil.rmtree(pathlib.Path(workdir) / stage.name / "model", ignore_errors=True)
