"""Copy a study's results into a folder meant for the repository (e.g. experiments/results/study_smollm2):
results.json, results.md, the plots, every stage's recipe, timing and key, every training run's metrics,
the per-item samples of every row (gzip), the judges that scored them, so anyone can re-score them
(`--rescore`), and the Stage A experts as PEFT adapters (`experts/<axis>/`, ~6 MB each), so the study can
go on from this folder on another machine (`--restore`). The folder is replaced as a whole
(io_atomic.output_dir)."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil

from h3jax import io_atomic
from h3jax.study import plan


def publish(sc, workdir, dest) -> str:
  w, dest = pathlib.Path(workdir), pathlib.Path(dest)
  src = w / "analysis"
  if not (src / "results.json").is_file():
    raise FileNotFoundError(f"{src / 'results.json'} not found: run the analysis stage first "
                            f"(python -m h3jax.study ... --only=analysis)")
  # replaces the whole folder (its judges/ too) only when complete; never a folder holding the workdir
  with io_atomic.output_dir(dest, overwrite=True, inputs=[w], own_subdirs=("judges", "experts"),
                            own_patterns=("*.gz",)) as tmp:
    for f in src.iterdir():
      if f.suffix in (".json", ".md", ".png") and f.name != "DONE.json":
        shutil.copy2(f, tmp / f.name)
    stage_recipes, timings = {}, {}
    stages = {s.name: s for s in plan.build(sc)}
    for p in sorted(w.glob("**/DONE.json")):
      rec = json.loads(p.read_text())
      timings[rec["stage"]] = {k: rec.get(k) for k in ("seconds", "cpu_seconds", "finished", "result", "key")}
      s = stages.get(rec["stage"])
      if s is not None and plan.is_current(s, rec.get("key")):  # also done under an old scheme or before keys
        timings[rec["stage"]]["key"] = s.key
      recipe = p.parent / "recipe.json"
      if recipe.is_file():
        stage_recipes[rec["stage"]] = json.loads(recipe.read_text())
    study = json.loads(sc.to_json_best_effort())
    (tmp / "recipes.json").write_text(json.dumps({"study": study, "stages": stage_recipes}, indent=1) + "\n")
    (tmp / "timings.json").write_text(json.dumps(timings, indent=1, default=str) + "\n")
    jdir = judges_dir(sc)
    if jdir.is_dir():  # the judges that scored the samples (~4 MB), so the table can be re-scored
      (tmp / "judges").mkdir()
      for name, f in judge_files(jdir).items():
        shutil.copy2(f, tmp / "judges" / name)
    _write_experts(sc, w, tmp / "experts")
    for m in sorted((w / "train").glob("*/metrics.jsonl")):  # the finished runs' curves (~10 kB a run)
      if (m.parent / "DONE.json").is_file():  # not a run still training beside the publish
        _gzip(m, tmp / f"metrics_{m.parent.name}.jsonl.gz")
    for s in sorted((w / "eval").glob("*/samples_*.jsonl")):
      _gzip(s, tmp / (s.name + ".gz"))
  return str(dest)


def judges_dir(sc) -> pathlib.Path:
  """The judges the study scores with (config, else $H3JAX_JUDGES_DIR / artifacts/judges)."""
  from h3jax.evaluation.judges import default_dir
  from h3jax.study import recipes
  return pathlib.Path(recipes.eval_config(sc).judges.dir or default_dir())


def judge_files(d: pathlib.Path) -> dict:
  """{file name: path} of the judge files in d (what a published judges/ holds); {} without d."""
  return {f.name: f for f in sorted(d.iterdir()) if f.suffix in (".json", ".npz")} if d.is_dir() else {}


def _gzip(src: pathlib.Path, dst: pathlib.Path) -> None:
  with open(src, "rb") as fin, gzip.GzipFile(dst, "wb", mtime=0) as fout:  # mtime 0: same bytes every run
    shutil.copyfileobj(fin, fout)


def _write_experts(sc, w: pathlib.Path, out: pathlib.Path) -> None:
  """Each trained Stage A expert as a PEFT adapter (LoRA factors only, checked: every other tensor equals
  the base's), named relative to the checkout when the base lives in it."""
  from h3jax import checkpoint
  from h3jax.hf import adapters
  from h3jax.hf.load import load_pretrained
  from h3jax.study.defaults import AXES
  ckpts = {a: w / "train" / f"expert_{a}" / "checkpoints" for a in AXES}
  ckpts = {a: d for a, d in ckpts.items() if (w / "train" / f"expert_{a}" / "DONE.json").is_file() and d.is_dir()}
  if not ckpts:
    return
  _, base_params = load_pretrained(sc.base)
  repo = pathlib.Path(__file__).absolute().parents[2]
  base = pathlib.Path(sc.base).absolute()
  base_name = str(base.relative_to(repo)) if base.is_relative_to(repo) else str(sc.base)
  out.mkdir()
  for a, d in ckpts.items():
    cfg, params = checkpoint.load_params(d)
    adapters.check_only_lora_trained(params, base_params, base_name)
    adapters.save_adapter(cfg, params, out / a, base_model_name_or_path=base_name)
