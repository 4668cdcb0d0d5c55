"""Re-score a published study from its per-item samples and its judges, and compare with its table.

  python -m h3jax.study --config=configs/study_smollm2.py --workdir=runs/study_smollm2 \
      --rescore=experiments/results/study_smollm2

Reads DIR/samples_<row>.jsonl.gz (prompt id, generation, MC scores), the judges in DIR/judges, and the
eval items (for the AlpacaEval reference outputs) from the data root; recomputes every row's metrics with
the evaluation's own metric functions and reports the largest difference from DIR/results.json.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from h3jax.evaluation import harm, helpful, metrics, truthfulqa
from h3jax.study import analysis, recipes


def rescore_samples(samples: list, items_by_id: dict, judges, config) -> dict:
  """Metrics of one row from its samples (the keys of score_model's metrics)."""
  out = {}
  by_set = {}
  for s in samples:
    by_set.setdefault(s["set"], []).append(s)
  if "alpaca_eval" in by_set:
    rows = by_set["alpaca_eval"]
    ms = helpful.win_rate_metrics(judges["pairwise"], [items_by_id[s["id"]] for s in rows],
                                  [s["response"] for s in rows], tuple(config.references))
    out.update({f"helpful/{k}": v for k, v in ms.items() if k != "per_item"})
  if "truthfulqa_gen" in by_set:
    rows = by_set["truthfulqa_gen"]
    qs, outs = [s["prompt"] for s in rows], [s["response"] for s in rows]
    ms = truthfulqa.truth_info_metrics(judges["truth"].score(qs, outs), judges["info"].score(qs, outs),
                                       config.threshold)
    out.update({f"honest/{k}": v for k, v in ms.items() if k != "per_item"})
  if "truthfulqa_mc" in by_set:
    rows = by_set["truthfulqa_mc"]
    out["honest/mc1"] = metrics.summary([s["mc1"] for s in rows])
    out["honest/mc2"] = metrics.summary([s["mc2"] for s in rows])
  per_set = {}
  for name in harm.HARMFUL_SETS + harm.XSTEST_SETS:
    if name in by_set:
      rows = by_set[name]
      p = judges["refusal"].score([s["prompt"] for s in rows], [s["response"] for s in rows])
      per_set[name] = harm.set_metrics(name, p, config.threshold)
      out.update({f"harmless/{name}/{k}": v for k, v in per_set[name].items()})
  if any(n in per_set for n in harm.HARMFUL_SETS):
    out["harmless/compliance_rate"] = harm.pooled_compliance(per_set)
  cut = [float(s["cut"]) for s in samples if s.get("cut") is not None]
  if cut:
    out["generation/cut_rate"] = metrics.summary(cut)
  return out


def rescore(sc, published) -> dict:
  """{"rows": {row: max |difference|}, "max_abs_diff"} between re-scored and published metrics."""
  from h3jax.evaluation import sets as eval_sets
  from h3jax.evaluation.judges import load_judges
  d = pathlib.Path(published)
  res = json.loads((d / "results.json").read_text())
  config = recipes.eval_config(sc, "eval")
  judges = load_judges({"kind": "local", "dir": str(d / "judges"), "build_if_missing": False})
  items = {it["id"]: it for its in eval_sets.load_eval_sets(config).values() for it in its}
  diffs = {}
  for row, entry in res["models"].items():
    samples = analysis._read_samples(d / f"samples_{row}.jsonl.gz")
    got = rescore_samples(samples, items, judges, config)
    worst = 0.0
    for k, m in entry["metrics"].items():
      if k in got and math.isfinite(m["value"]) and math.isfinite(got[k]["value"]):
        worst = max(worst, abs(got[k]["value"] - m["value"]))
      elif k in got and math.isfinite(m["value"]) != math.isfinite(got[k]["value"]):
        worst = float("inf")
    missing = sorted(set(entry["metrics"]) - set(got))
    diffs[row] = {"max_abs_diff": worst, "not_rescored": missing}
  return {"rows": diffs, "max_abs_diff": float(np.max([v["max_abs_diff"] for v in diffs.values()]))}
