"""results.md of the study, and the length check of the pairwise helpfulness judge."""

from __future__ import annotations

import math

import numpy as np

from h3jax.evaluation.judges.train import wilson
from h3jax.study.analysis import TABLE
from h3jax.study.defaults import AXES


def _fmt(m) -> str:
  if not m or m.get("value") is None or not math.isfinite(m["value"]):
    return "n/a"
  se = m.get("stderr")
  se_txt = f" ± {100 * se:.1f}" if se is not None and math.isfinite(se) else ""
  return f"{100 * m['value']:.1f}{se_txt}"


def _pt(x) -> str:
  return f"{100 * x:+.1f}"


def markdown(sc, results: dict) -> str:
  rows = list(results["models"])
  lines = [f"# {sc.name}: 3H study results", "",
           "Values in % ± one standard error (n per set in the second table); study axes: helpful = win rate vs "
           "text_davinci_003, harmless = 1 − pooled harmful compliance, honest = truthful ∧ informative; "
           "3H = their mean.", "",
           "| row | " + " | ".join(c for c, _ in TABLE) + " | helpful | harmless | honest | 3H | cut |",
           "|---|" + "---:|" * (len(TABLE) + 5)]
  for r in rows:
    e = results["models"][r]
    ax = e.get("study_axes", {})
    cut = e.get("cut") or {}
    cut_txt = f"{100 * cut['value']:.1f}" if cut.get("n") else "n/a"
    lines.append(f"| {r} | " + " | ".join(_fmt(e["metrics"].get(k)) for _, k in TABLE) + " | "
                 + " | ".join(f"{100 * ax[a]:.1f}" if a in ax else "n/a" for a in (*AXES, "3h"))
                 + f" | {cut_txt} |")
  if results.get("pending_rows"):
    lines += ["", f"Pending rows (not evaluated yet): {', '.join(results['pending_rows'])}."]
  first = results["models"][rows[0]]["metrics"]
  lines += ["", "Sample sizes: " + ", ".join(f"{k} n={first[k]['n']}" for _, k in TABLE if k in first), ""]
  lines += ["## Comparisons (paired bootstrap over items, 95% CI, points)", "",
            "| comparison | Δ helpful | Δ harmless | Δ honest | Δ 3H | 3H verdict |", "|---|---:|---:|---:|---:|---|"]
  for c in results["comparisons"]:
    cells = []
    for k in (*AXES, "3h"):
      d = c.get(k)
      cells.append(f"{_pt(d['diff'])} [{_pt(d['ci95'][0])}, {_pt(d['ci95'][1])}]" if d else "n/a")
    lines.append(f"| {c['what']}: {c['a']} − {c['b']} | " + " | ".join(cells)
                 + f" | {c['verdict'].get('3h', 'n/a')} |")
  bar = results.get("expert_bar") or {}
  if bar:
    lines += ["", "Expert vs base on its own axis (bar: Δ ≥ 3 bootstrap SE): "
              + "; ".join(f"{a} Δ {_pt(v['diff'])} pts, {v['z']:.1f} SE ({'met' if v['meets_3se'] else 'NOT met'})"
                          for a, v in bar.items())]
  jl = results.get("judge_length_check")
  if jl:
    lines += ["", f"Pairwise judge on held-out pairs where the longer answer is NOT preferred: agreement "
              f"{100 * jl['agreement']:.1f}% (95% CI {100 * jl['ci95'][0]:.1f}–{100 * jl['ci95'][1]:.1f}, "
              f"n = {jl['n']}; chance 50%, 'longer wins' 0%). {jl['conclusion']}"]
  lines += ["", "Plots: " + ", ".join(results.get("plots", [])), ""]
  return "\n".join(lines)


def judge_length_check(sc) -> dict:
  """Agreement of the pairwise judge on held-out AlpacaEval preference pairs where the shorter answer
  won: a judge that only measures length scores 0% there, chance is 50%."""
  from h3jax.evaluation.judges import data as jdata
  from h3jax.evaluation.judges import load_judges
  from h3jax.study import recipes
  cfg = recipes.eval_config(sc, "eval")
  if cfg.judges.kind != "local":
    return None
  judges = load_judges({k: v for k, v in cfg.judges.items() if v not in ("", None)})
  judge = judges.get("pairwise") if judges is not None else None
  if judge is None:
    return None
  d = jdata.pairwise_data(cfg.data_root or None)
  a_idx, b_idx = d.pairs
  keep = np.flatnonzero(~d.train & d.scored & (d.label != d.baselines["longer_wins"]))
  instr = [d.rows[a_idx[i]][0] for i in keep]
  p = judge.prefer(instr, [d.rows[a_idx[i]][1] for i in keep], [d.rows[b_idx[i]][1] for i in keep])
  agree = (p > 0.5) == d.label[keep]
  n, k = len(keep), int(agree.sum())
  lo, hi = wilson(k, n)
  concl = ("Clearly above chance: the judge does more than prefer length." if lo > 0.5 else
           "Not clearly above chance: helpfulness conclusions are length-driven.")
  return {"n": n, "agreement": k / max(n, 1), "ci95": [lo, hi], "conclusion": concl}
