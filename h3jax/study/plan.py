"""The study as a DAG of stages, built from the study config.

Stage names are paths under the workdir (`train/expert_helpful`, `merge/merge_ties/g1`,
`val/merge_ties/g1`, `select/merge_ties`, `gen/moe_gate/0of2`, `score/moe_gate`, `analysis`); each
stage's output lives in that folder and is complete when its DONE.json exists and records the stage's
current key: a hash of the settings the stage reads and of its dependencies' keys, so a changed config
(or a redone dependency) makes the stage and everything after it stale, to be redone. Models of rows:

  base                   the base folder
  expert_<axis>          train/expert_<axis>/hf      (Stage A)
  mixture_sft            train/mixture_sft/hf
  ensemble_logits        the three expert folders, combined per decoding step (h3jax.model.ensemble)
  merge_* rows           merge/<row>/<grid point>/model, the grid point chosen on validation
  moe_* rows, γ sweep    train/<row>/hf                (Stage B, or build only for moe_untrained)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import pathlib
from typing import Dict, List, Optional, Tuple

import numpy as np

from h3jax.study import recipes
from h3jax.study.defaults import AXES, MERGE_ROWS, MOE_ROWS

# CPU-second estimates for --list / ETA (measured on 2 cores; the config can override `cost`).
DEFAULT_COST = dict(train_step=16.0, moe_step=40.0, merge=120.0, gen_item=4.0, gen_item_val=2.5,
                    mc_item=1.2, moe_gen_factor=2.0, ensemble_gen_factor=3.0, score=60.0)
# Eval-split sizes (h3jax.evaluation.sets), for estimates of "all items" samples.
FULL_SIZES = dict(alpaca_eval=433, harmbench=240, strongreject=313, advbench=403, xstest_safe=250,
                  xstest_unsafe=200, truthfulqa_gen=415, truthfulqa_mc=415)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  kind: str  # train | merge | val | select | gen | score | analysis
  deps: Tuple[str, ...]
  est_s: float
  args: Tuple[Tuple[str, object], ...] = ()
  key: str = ""  # hash of the stage's settings and its dependencies' keys (with_keys)
  old_keys: Tuple[str, ...] = ()  # the same settings' keys under an earlier key scheme (with_keys)

  @property
  def arg(self) -> dict:
    return dict(self.args)


def _cost(sc) -> dict:
  c = dict(DEFAULT_COST)
  if "cost" in sc:
    c.update(dict(sc.cost))
  return c


def moe_rows(sc) -> Dict[str, dict]:
  """Every Stage B row: the named variants in sc.rows plus the γ sweep (a sweep point equal to the
  main row's γ is that row). Sweep rows are scored on the validation items only."""
  out = {r: dict(sc.moe[r]) for r in sc.rows if r in MOE_ROWS}
  for name, ov in recipes.gamma_sweep_rows(sc).items():
    main = dict(sc.moe.get("moe_gate_drift", {}))
    if main and tuple(ov["loss"]["drift_weights"]) == tuple(main["loss"]["drift_weights"]):
      continue
    out[name] = ov
  return out


def gamma_points(sc) -> List[Tuple[float, str]]:
  """(γ1, row) of the γ sweep plot, including the main row where it is a sweep point."""
  pts = []
  main = dict(sc.moe.get("moe_gate_drift", {}))
  for name, ov in recipes.gamma_sweep_rows(sc).items():
    g = ov["loss"]["drift_weights"]
    same = main and tuple(g) == tuple(main["loss"]["drift_weights"])
    pts.append((float(g[0]), "moe_gate_drift" if same else name))
  return pts


def validate(sc) -> None:
  """Config errors before any work: unknown rows, merges without experts, bad grids."""
  from h3jax.study.defaults import ROWS
  unknown = [r for r in sc.rows if r not in ROWS]
  if unknown:
    raise ValueError(f"unknown study rows {unknown}; known rows: {list(ROWS)}")
  for r in sc.rows:
    if r in MERGE_ROWS:
      if r not in sc.merges:
        raise ValueError(f"row {r!r} has no entry in config.merges")
      from h3jax import merging
      merging.get_method(sc.merges[r].method)  # raises on an unknown method
      if not sc.merges[r].grid:
        raise ValueError(f"row {r!r}: merges.{r}.grid is empty")
      for i, point in enumerate(sc.merges[r].grid):  # names and values, before hours of merging
        try:
          merging.check_hparams(sc.merges[r].method, _plain(point), n_models=len(AXES))
        except ValueError as e:
          raise ValueError(f"row {r!r}, grid point g{i} {_plain(point)}: {e}") from None
    if r in MOE_ROWS and r not in sc.moe:
      raise ValueError(f"row {r!r} has no entry in config.moe")
  from h3jax.data import pipeline
  for spec in recipes.axis_data(sc):
    pipeline.check_spec(spec)
  for a in AXES:
    if a not in sc.expert_steps:
      raise ValueError(f"config.expert_steps has no entry for the {a!r} expert (every merge, MoE and "
                       f"ensemble row needs the three experts)")


def model_dir(workdir, row: str, choice: str = "") -> str:
  """Where a row's evaluated model lives (merge rows: the chosen grid point's folder)."""
  w = pathlib.Path(workdir)
  if row.startswith("merge_"):
    return str(w / "merge" / row / choice / "model")
  return str(w / "train" / row / "hf")


def resolve_base(sc, workdir) -> None:
  """A config without a base folder but with `tiny_base` (configs/study_tiny.py) gets a random tiny
  base built by the `base` stage at <workdir>/base/hf, with the tokenizer of `sc.tokenizer`."""
  if not sc.base and sc.get("tiny_base"):
    if not sc.tokenizer:
      raise ValueError("a tiny_base study needs config.tokenizer (an HF folder whose tokenizer it uses)")
    with sc.unlocked():
      sc.base = str(pathlib.Path(workdir).resolve() / "base" / "hf")
  if not sc.base:
    raise ValueError("config.base is empty: give the base model's HF folder (or tiny_base for a random one)")


def build(sc) -> List[Stage]:
  """Every stage of the study, dependencies before dependants, with their keys."""
  validate(sc)
  stages = _build(sc)
  if sc.get("tiny_base"):
    stages = [Stage("base", "base", (), 10.0)] + [
        dataclasses.replace(s, deps=s.deps or ("base",)) if s.kind != "analysis" else s for s in stages]
  return with_keys(sc, stages)


def _plain(x):
  return x.to_dict() if hasattr(x, "to_dict") else x


def stage_settings(sc, s: Stage) -> dict:
  """What a stage's output depends on besides its dependencies' outputs (hashed into its key, less where
  things live: `_location_free`)."""
  row = s.arg.get("row")
  common = {"kind": s.kind, "args": [list(a) for a in s.args], "base": sc.base}
  if s.kind == "base":
    return dict(common, tiny=_plain(sc.get("tiny_base")), std=sc.get("tiny_std"), seed=sc.get("seed"),
                tokenizer=sc.tokenizer)
  if s.kind == "train":  # the resolved training recipe (expert checkpoints by their place in the workdir)
    if row.startswith("expert_"):
      c = recipes.expert_config(sc, row[len("expert_"):])
    elif row == "mixture_sft":
      c = recipes.mixture_config(sc)
    else:
      c = recipes.moe_config(sc, moe_rows(sc)[row], [f"train/expert_{a}/checkpoints" for a in AXES])
    return dict(common, recipe=_plain(c))
  if s.kind in ("merge", "select"):
    return dict(common, merge=_plain(sc.merges[row]), tokenizer=sc.tokenizer)
  if s.kind in ("val", "gen", "score"):
    part = "validation" if s.kind == "val" else "eval"
    return dict(common, eval=_plain(recipes.eval_config(sc, part)))
  return common  # analysis: redone on every run


# Paths inside the checkout (the base model under artifacts/) are hashed relative to it, so another
# worktree or a moved clone keeps the keys.
_REPO = str(pathlib.Path(__file__).resolve().parents[2])


DATA_ROOT_MARK = "<data root>"


def _location_free(settings: dict) -> dict:
  """The settings without where the training data lives: its content is pinned by third_party/datasets.json."""
  if "recipe" not in settings:
    return settings
  recipe = settings["recipe"]
  return dict(settings, recipe=dict(recipe, data=dict(recipe["data"], data_root=DATA_ROOT_MARK)))


def _key(sc, settings: dict, dep_keys: list) -> str:
  blob = json.dumps([settings, dep_keys], sort_keys=True, default=str)
  blob = blob.replace(_REPO, "<repo>")
  if sc.get("tiny_base"):  # the tiny base lives in the workdir; the `base` stage's key stands for it
    blob = blob.replace(str(sc.base), "<tiny base>")
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def with_keys(sc, stages: List[Stage]) -> List[Stage]:
  """The stages with their keys. `old_keys` holds the key each stage had under the previous scheme, which
  hashed the training data root's absolute path: stages done (or published) under it stay done where the
  data root is the same, and are recorded under the current key from then on."""
  keys, legacy, out = {}, {}, []
  for s in stages:  # dependencies come first
    settings = stage_settings(sc, s)
    keys[s.name] = _key(sc, _location_free(settings), [keys.get(d, d) for d in s.deps])
    legacy[s.name] = _key(sc, settings, [legacy.get(d, d) for d in s.deps])
    old = (legacy[s.name],) if legacy[s.name] != keys[s.name] else ()
    out.append(dataclasses.replace(s, key=keys[s.name], old_keys=old))
  return out


def is_current(s: Stage, key: Optional[str]) -> bool:
  """Whether a record under `key` is one of this stage's current settings (None: a record from before keys)."""
  return key is None or key == s.key or key in s.old_keys


def done_record(workdir, s: Stage) -> Optional[dict]:
  """The stage's DONE.json when it is done with the stage's current key (a DONE.json from before keys
  counts as current); None when not done or stale."""
  path = pathlib.Path(workdir) / s.name / "DONE.json"
  if not path.is_file():
    return None
  rec = json.loads(path.read_text())
  return rec if is_current(s, rec.get("key")) else None


def is_stale(workdir, s: Stage) -> bool:
  """Done, but with another key: its settings or a dependency changed since."""
  path = pathlib.Path(workdir) / s.name / "DONE.json"
  return path.is_file() and done_record(workdir, s) is None


def _build(sc) -> List[Stage]:
  cost = _cost(sc)
  ev = recipes.eval_config(sc, "eval")
  gen_sets = [s for s in ev.sets if s != "truthfulqa_mc"]
  n_gen = sum(int(ev.sample.get(s, 0)) or FULL_SIZES[s] - int(ev.holdout.get(s, 0)) for s in gen_sets)
  n_mc = (int(ev.sample.get("truthfulqa_mc", 0)) or FULL_SIZES["truthfulqa_mc"] - int(ev.holdout.get(
      "truthfulqa_mc", 0))) if "truthfulqa_mc" in ev.sets else 0
  val_sets = tuple(sc.validation.sets)
  n_val = sum(int(ev.holdout.get(s, 0)) for s in val_sets if s != "truthfulqa_mc")
  n_val_mc = int(ev.holdout.get("truthfulqa_mc", 0)) if "truthfulqa_mc" in val_sets else 0
  shards = int(sc.eval.shards)
  stages: List[Stage] = []
  experts = tuple(f"train/expert_{a}" for a in AXES)
  moe = moe_rows(sc)
  sweep = {r for _, r in gamma_points(sc)}

  def evaluate(r, deps, factor=1.0):
    gens = [f"gen/{r}/{i}of{shards}" for i in range(shards)]
    stages.extend(Stage(g, "gen", deps, factor * n_gen * cost["gen_item"] / shards,
                        (("row", r), ("shard", (i, shards)))) for i, g in enumerate(gens))
    stages.append(Stage(f"score/{r}", "score", tuple(gens), factor * n_mc * cost["mc_item"] + cost["score"],
                        (("row", r),)))

  # Plan order is the order ready stages start in: the experts, then each row's whole chain (the rows the
  # other comparisons need first: base and experts, then baselines, merges, H3Fusion, the γ sweep).
  for a in AXES:
    stages.append(Stage(f"train/expert_{a}", "train", (), cost["train_step"] * sc.expert_steps[a],
                        (("row", f"expert_{a}"),)))
  rows = list(sc.rows) + [r for r in moe if r not in sc.rows]  # config order, then the γ sweep
  for r in rows:
    if r == "base":
      evaluate(r, ())
    elif r.startswith("expert_"):
      evaluate(r, (f"train/{r}",))
    elif r == "mixture_sft":
      steps = sc.mixture_steps or sum(sc.expert_steps[a] for a in AXES)
      stages.append(Stage("train/mixture_sft", "train", (), cost["train_step"] * steps, (("row", r),)))
      evaluate(r, ("train/mixture_sft",))
    elif r == "ensemble_logits":
      evaluate(r, experts, cost["ensemble_gen_factor"])
    elif r in MERGE_ROWS:
      grid = list(sc.merges[r].grid)
      for i in range(len(grid)):
        stages.append(Stage(f"merge/{r}/g{i}", "merge", experts, cost["merge"], (("row", r), ("point", i))))
        if len(grid) > 1:
          stages.append(Stage(f"val/{r}/g{i}", "val", (f"merge/{r}/g{i}",),
                              n_val * cost["gen_item_val"] + n_val_mc * cost["mc_item"] + cost["score"],
                              (("row", r), ("point", i))))
      deps = tuple(f"val/{r}/g{i}" for i in range(len(grid))) if len(grid) > 1 else (f"merge/{r}/g0",)
      stages.append(Stage(f"select/{r}", "select", deps, 1.0, (("row", r),)))
      evaluate(r, (f"select/{r}",))
    else:  # H3Fusion variants and γ sweep points
      steps = moe[r].get("steps", sc.stage_b_steps)
      stages.append(Stage(f"train/{r}", "train", experts, cost["moe_step"] * steps + cost["merge"], (("row", r),)))
      if r in sc.rows:
        evaluate(r, (f"train/{r}",), cost["moe_gen_factor"])
      if r in sweep:  # a hyper-parameter sweep: scored on the validation items, like the merge grids
        stages.append(Stage(f"val/{r}", "val", (f"train/{r}",), cost["moe_gen_factor"] * (
            n_val * cost["gen_item_val"] + n_val_mc * cost["mc_item"]) + cost["score"], (("row", r),)))
  # Analysis reads whatever rows are scored; the runner runs it last, after every other selected stage
  # finished or failed, and again on every run (it is never "done").
  stages.append(Stage("analysis", "analysis", (), 60.0))
  return stages


def family(s: Stage) -> Tuple[str, str]:
  """Stages whose cost scales alike: the kind and the kind of model (MoE, merge, ensemble, dense)."""
  row = s.arg.get("row", "")
  group = ("moe" if row.startswith("moe_") else "merge" if row.startswith("merge_")
           else "ensemble" if row == "ensemble_logits" else "dense")
  return s.kind, group


def calibrated(workdir, stages: List[Stage]) -> List[Stage]:
  """The stages with the estimates of pending ones scaled by what finished stages measured: per family
  (`family`) the median of measured / estimated CPU seconds, else per kind, else the config's cost model.
  The config's costs were guessed before anything ran (MoE decoding, e.g., was budgeted at 5x dense)."""
  ratios, by_kind = {}, {}
  for s in stages:
    rec = done_record(workdir, s)
    if rec is not None and s.est_s > 0 and rec.get("cpu_seconds"):
      r = float(rec["cpu_seconds"]) / s.est_s
      ratios.setdefault(family(s), []).append(r)
      by_kind.setdefault(s.kind, []).append(r)
  out = []
  for s in stages:
    r = ratios.get(family(s)) or by_kind.get(s.kind)
    out.append(dataclasses.replace(s, est_s=s.est_s * float(np.median(r))) if r else s)
  return out


def select(stages: List[Stage], patterns) -> List[Stage]:
  """The stages matching any of the glob patterns (all when none)."""
  if not patterns:
    return list(stages)
  out = [s for s in stages if any(fnmatch.fnmatch(s.name, p) for p in patterns)]
  if not out:
    raise ValueError(f"--only={','.join(patterns)} matches no stage; see --list for the stage names")
  return out
