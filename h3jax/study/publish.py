"""Copy a study's results into a folder meant for the repository (e.g. experiments/results/study_smollm2):
results.json, results.md, the plots, every stage's recipe and timing, the per-item samples of every
row (gzip) and the judges that scored them, so anyone can re-score them (`--rescore`). The folder is replaced as a whole (temp dir, then rename)."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import tempfile


def publish(sc, workdir, dest) -> str:
  w, dest = pathlib.Path(workdir), pathlib.Path(dest)
  src = w / "analysis"
  if not (src / "results.json").is_file():
    raise FileNotFoundError(f"{src / 'results.json'} not found: run the analysis stage first "
                            f"(python -m h3jax.study ... --only=analysis)")
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
  try:
    for f in src.iterdir():
      if f.suffix in (".json", ".md", ".png"):
        shutil.copy2(f, tmp / f.name)
    recipes, timings = {}, {}
    for p in sorted(w.glob("**/DONE.json")):
      rec = json.loads(p.read_text())
      timings[rec["stage"]] = {k: rec.get(k) for k in ("seconds", "cpu_seconds", "finished", "result")}
      recipe = p.parent / "recipe.json"
      if recipe.is_file():
        recipes[rec["stage"]] = json.loads(recipe.read_text())
    (tmp / "recipes.json").write_text(json.dumps({"study": json.loads(sc.to_json_best_effort()), "stages": recipes},
                                                 indent=1) + "\n")
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
    os.chmod(tmp, 0o755)
    old = None
    if dest.exists():
      old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
      dest.rename(old)
    tmp.rename(dest)
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return str(dest)
