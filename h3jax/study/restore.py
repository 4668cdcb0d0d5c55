"""Restore a study workdir from a published folder, so a study run over several machines goes on where
the published one stopped (a new machine has none of the old workdir).

  python -m h3jax.study --config=configs/study_smollm2.py --workdir=runs/study_smollm2 \
      --restore=experiments/results/study_smollm2

What a published folder (`--publish`) holds comes back as finished stages under the current stage keys:
  * the Stage A experts (`experts/<axis>/`, PEFT adapters): `train/expert_<axis>` with its checkpoint
    (base + adapter, the same float32 tensors) and its HF export, so Stage B, merges and the ensemble can
    use them;
  * every scored row: its per-item samples and metrics (`eval/<row>/`) and done `gen/<row>/*`,
    `score/<row>` records, so the analysis and the next `--publish` include it;
  * a random tiny base (configs/study_tiny.py) is rebuilt by its stage (seeded, seconds);
  * every other published stage a published result rests on (the merges, selections and training runs
    behind the published rows, and every validation score): its DONE record only, marked
    `"outputs": "not restored"`; a finished stage no published row rests on (a Stage B run or generation
    shard whose row was not scored yet) is left pending, to be redone. A stage that would need the
    outputs of a record is refused, naming the record to delete (runner.check_restored_deps). Training
    runs keep their metrics (the curves plot).
Refused before anything is written: a published study config that differs from this one (model paths
aside), published stage keys that differ from this config's, or local judges other than the published
ones (new rows would be scored by other judges). Stages the workdir already has (done or started) are
left alone; a runner must not be using it.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil

from h3jax import io_atomic
from h3jax.study import plan
from h3jax.study.publish import judge_files, judges_dir
from h3jax.study.defaults import AXES

NOT_RESTORED = "not restored"
_PATH_KEYS = ("base", "tokenizer")  # absolute paths of the machine that published
_COSMETIC_KEYS = ("progress", "compile_cache")


def _normalized_study(study: dict) -> dict:
  s = {k: v for k, v in study.items() if k not in _COSMETIC_KEYS}
  for k in _PATH_KEYS:
    if s.get(k):
      s[k] = pathlib.Path(s[k]).name
  if isinstance(s.get("judges"), dict):  # where the judges live is checked by content (_check_judges)
    s["judges"] = {k: v for k, v in s["judges"].items() if k != "dir"}
  return s


def _check_config(sc, published_study: dict, src: pathlib.Path) -> None:
  cur, pub = _normalized_study(json.loads(sc.to_json_best_effort())), _normalized_study(published_study)
  diff = sorted(k for k in set(cur) | set(pub) if cur.get(k) != pub.get(k))
  if diff:
    raise ValueError(f"{src}: published under another study config (differs in {diff}); restoring it would "
                     f"mix results of other settings into this study")


def _gunzip_text(path: pathlib.Path) -> str:
  with gzip.open(path, "rt", encoding="utf-8", newline="") as f:  # bytes as published
    return f.read()


def _check_judges(sc, src: pathlib.Path) -> bool:
  """True when the local judges must be copied from the published folder (there are none yet)."""
  d = judges_dir(sc)
  pub, local = judge_files(src / "judges"), judge_files(d)
  if not pub:
    raise ValueError(f"{src}: no judges/ folder; its rows cannot be extended with comparable scores")
  if not local:
    if d.exists() and any(d.iterdir()):  # copying there would fail half-way, after the checks
      raise ValueError(f"{d} holds files but no judges; point the judges dir (H3JAX_JUDGES_DIR or "
                       f"--config.judges.dir) at an empty folder or at a copy of {src / 'judges'}")
    return True
  differ = sorted(n for n in pub if n not in local or pub[n].read_bytes() != local[n].read_bytes())
  if differ:
    raise ValueError(f"the judges in {d} differ from {src / 'judges'} ({differ}): new rows would "
                     f"be scored by other judges than the published ones; point the judges dir "
                     f"(H3JAX_JUDGES_DIR or --config.judges.dir) at an empty folder or at a copy of them")
  return False


def row_stages(stages, row: str) -> list:
  """The generation shards and the score stage of one row (by exact name: `score/merge_resm` is not a
  prefix match for `score/merge_resm_tuned`)."""
  return [n for n in stages if n.startswith(f"gen/{row}/")] + [f"score/{row}"]


def _done(w: pathlib.Path, stage: plan.Stage, timing: dict, src: pathlib.Path, outputs: bool,
          recipe=None) -> None:
  from h3jax.study.stages import _write_json
  d = w / stage.name
  d.mkdir(parents=True, exist_ok=True)
  if recipe is not None:
    _write_json(d / "recipe.json", recipe)
  io_atomic.write_text(d / "KEY", stage.key + "\n")
  rec = {"stage": stage.name, "kind": stage.kind, "key": stage.key, "result": timing.get("result"),
         "seconds": timing.get("seconds"), "cpu_seconds": timing.get("cpu_seconds"),
         "finished": timing.get("finished"), "restored_from": str(src)}
  if not outputs:
    rec["outputs"] = NOT_RESTORED
  metrics = src / f"metrics_{stage.name.split('/', 1)[1]}.jsonl.gz"
  if stage.kind == "train" and metrics.is_file():  # the training curves plot reads them
    io_atomic.write_text(d / "metrics.jsonl", _gunzip_text(metrics))
  _write_json(d / "DONE.json", rec)  # last: the stage counts as done only when everything is in place


def _restore_expert(sc, w: pathlib.Path, stage: plan.Stage, adapter: pathlib.Path, timing: dict, src, recipe):
  """train/expert_<axis>: a checkpoint holding base + adapter (LoRA leaves unmerged, as Stage A saved
  them) at the trained step, and the merged HF export."""
  import h3jax
  from h3jax import checkpoint
  from h3jax.hf import adapters
  cfg, params = adapters.load_with_adapter(sc.base, adapter)
  if recipe:  # the training run's dropout setting, as its own checkpoint recorded it
    cfg = cfg.replace(lora_dropout=float(recipe.get("lora", {}).get("dropout", cfg.lora_dropout)))
  d = w / stage.name
  d.mkdir(parents=True)  # restore() skips stages the workdir already has
  step = int((timing.get("result") or {}).get("steps") or (recipe or {}).get("train", {}).get("steps") or 0)
  with checkpoint.Checkpointer(d / "checkpoints", max_to_keep=None) as ckpt:
    ckpt.save(step, params=params, config=cfg, extra={"restored_from": str(adapter)}, force=True)
    ckpt.wait()
  from h3jax.model.lora import merge_lora
  h3jax.save_pretrained(merge_lora(params, cfg.lora_scale), cfg.replace(lora_scale=1.0, lora_dropout=0.0),
                        d / "hf", overwrite=True, tokenizer_source=sc.tokenizer or sc.base)
  _done(w, stage, timing, src, True, recipe)


def _restore_row(w: pathlib.Path, row: str, results: dict, src: pathlib.Path) -> None:
  entry = {k: v for k, v in results["models"][row].items() if k not in ("study_axes", "cut")}
  d = w / "eval" / row
  d.mkdir(parents=True, exist_ok=True)
  io_atomic.write_text(d / f"samples_{row}.jsonl", _gunzip_text(src / f"samples_{row}.jsonl.gz"))
  res = {"models": {row: entry}, "timing": {row: (results.get("timing") or {}).get(row)},
         "settings": results.get("settings"), "judges": results.get("judges"), "restored_from": str(src)}
  io_atomic.write_text(d / "results.json", json.dumps(res, indent=1) + "\n")


def restore(sc, workdir, published) -> dict:
  """Restores what `published` holds into `workdir` (see the module docstring); returns what it did."""
  src, w = pathlib.Path(published), pathlib.Path(workdir)
  for f in ("results.json", "recipes.json", "timings.json"):
    if not (src / f).is_file():
      raise FileNotFoundError(f"{src / f} not found: not a folder written by --publish")
  results = json.loads((src / "results.json").read_text())
  recipes_pub = json.loads((src / "recipes.json").read_text())
  timings = json.loads((src / "timings.json").read_text())
  _check_config(sc, recipes_pub["study"], src)
  stages = {s.name: s for s in plan.build(sc)}
  unknown = sorted(n for n in timings if n not in stages)
  stale = sorted(n for n, t in timings.items() if n in stages and not plan.is_current(stages[n], t.get("key")))
  if unknown or stale:
    raise ValueError(f"{src}: stages {(unknown + stale)[:5]} are not this config's stages (unknown {len(unknown)}, "
                     f"other keys {len(stale)}); published under other settings or another h3jax version")
  rows = sorted(results.get("models", {}))
  missing = [r for r in rows if not (src / f"samples_{r}.jsonl.gz").is_file() or f"score/{r}" not in stages]
  if missing:
    raise ValueError(f"{src}: rows {missing} have no samples file or are not rows of this config")
  experts = {a: src / "experts" / a for a in AXES if (src / "experts" / a / "adapter_config.json").is_file()}
  copy_judges = _check_judges(sc, src)
  from h3jax.study import runner
  lock = runner.lock_workdir(w)  # not while a runner starts stages in it
  try:
    # ---- checks done; writes from here on
    if copy_judges:
      jd = judges_dir(sc)
      with io_atomic.output_dir(jd, overwrite=False) as tmp:
        for name, f in judge_files(src / "judges").items():
          shutil.copy2(f, tmp / name)
    out = {"experts": [], "rows": [], "records": [], "skipped": []}
    if "base" in stages and not (w / "base").exists():  # a random tiny base (study_tiny): rebuilt, seconds
      runner.run_stage(sc, w, stages["base"])
    for a, adapter in experts.items():
      s = stages[f"train/expert_{a}"]
      if (w / s.name).exists():  # trained (or training) here: left alone
        out["skipped"].append(s.name)
        continue
      _restore_expert(sc, w, s, adapter, timings.get(s.name, {}), src, recipes_pub["stages"].get(s.name))
      out["experts"].append(a)
    for r in rows:
      names = row_stages(stages, r)
      if (w / "eval" / r).exists() or any((w / n).exists() for n in names):  # evaluated (or running) here
        out["skipped"].append(f"score/{r}")
        continue
      _restore_row(w, r, results, src)
      for n in names:
        _done(w, stages[n], timings.get(n, {}), src, True)
      out["rows"].append(r)
    owned = {n for r in out["rows"] for n in row_stages(stages, r)}
    owned |= {f"train/expert_{a}" for a in experts} | {"base"}
    # Records (no outputs) only where a published result rests on them: what the published rows were built
    # from, and validation scores (merge grids, the γ sweep). A run that finished without its row being
    # published (a Stage B run, a generation shard) is left to be redone: its outputs are lost anyway.
    needed = set()
    todo = [n for r in rows for n in row_stages(stages, r)]
    todo += [n for n in timings if stages[n].kind == "val"]
    while todo:
      n = todo.pop()
      if n not in needed:
        needed.add(n)
        todo.extend(stages[n].deps)
    out["left"] = []
    for n, t in sorted(timings.items()):
      s = stages[n]
      if n in owned or s.kind == "analysis" or (w / n).exists():
        continue
      if n not in needed:
        out["left"].append(n)
        continue
      _done(w, s, t, src, False, recipes_pub["stages"].get(n))
      out["records"].append(n)
  finally:
    lock.close()
  return out
