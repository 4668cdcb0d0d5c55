"""Copy a study's results into a folder meant for the repository (e.g. experiments/results/study_smollm2):
results.json, results.md, the plots, every stage's recipe and timing, the per-item samples of every
row (gzip) and the judges that scored them, so anyone can re-score them (`--rescore`). The folder is
replaced as a whole (io_atomic.output_dir)."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil

from h3jax import io_atomic


def publish(sc, workdir, dest) -> str:
  w, dest = pathlib.Path(workdir), pathlib.Path(dest)
  src = w / "analysis"
  if not (src / "results.json").is_file():
    raise FileNotFoundError(f"{src / 'results.json'} not found: run the analysis stage first "
                            f"(python -m h3jax.study ... --only=analysis)")
  # replaces the whole folder (its judges/ too) only when complete; never a folder holding the workdir
  with io_atomic.output_dir(dest, overwrite=True, inputs=[w], own_subdirs=("judges",),
                            own_patterns=("*.gz",)) as tmp:
    for f in src.iterdir():
      if f.suffix in (".json", ".md", ".png") and f.name != "DONE.json":
        shutil.copy2(f, tmp / f.name)
    stage_recipes, timings = {}, {}
    for p in sorted(w.glob("**/DONE.json")):
      rec = json.loads(p.read_text())
      timings[rec["stage"]] = {k: rec.get(k) for k in ("seconds", "cpu_seconds", "finished", "result")}
      recipe = p.parent / "recipe.json"
      if recipe.is_file():
        stage_recipes[rec["stage"]] = json.loads(recipe.read_text())
    study = json.loads(sc.to_json_best_effort())
    (tmp / "recipes.json").write_text(json.dumps({"study": study, "stages": stage_recipes}, indent=1) + "\n")
    (tmp / "timings.json").write_text(json.dumps(timings, indent=1, default=str) + "\n")
    from h3jax.evaluation.judges import default_dir
    from h3jax.study import recipes
    jdir = pathlib.Path(recipes.eval_config(sc).judges.dir or default_dir())
    if jdir.is_dir():  # the judges that scored the samples (~4 MB), so the table can be re-scored
      (tmp / "judges").mkdir()
      for f in jdir.iterdir():
        if f.suffix in (".json", ".npz"):
          shutil.copy2(f, tmp / "judges" / f.name)
    for s in sorted((w / "eval").glob("*/samples_*.jsonl")):
      with open(s, "rb") as fin, gzip.GzipFile(tmp / (s.name + ".gz"), "wb", mtime=0) as fout:
        shutil.copyfileobj(fin, fout)
  return str(dest)
