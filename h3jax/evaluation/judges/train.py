"""Trains the four local judges, measures held-out agreement next to trivial baselines, writes artifacts.

  python -m h3jax.evaluation.judges.train --out artifacts/judges [--data_root ../shared/data]

(the command line: h3jax/cli/judges.py, also `h3jax-judges`; the library function is `build_judges`).

Per judge (see `data` for the data and splits):
  1. hashed n-gram features of every example (cached in --cache_dir as npz keyed
     by the feature config and the data files' sha256);
  2. hyperparameters picked on an inner validation split of the *train* rows
     (keys with bucket('judge-val|' + key) < 20), never on held-out rows;
  3. fit on all train rows and report agreement with the human / GPT-4 labels on
     held-out (eval-split) rows, next to the majority class of the train labels
     and the judge's own baselines (XSTest string match, longer answer wins); the
     pairwise judge also on the held-out pairs where the shorter answer is preferred
     (a judge that only measures length scores 0% there) and where the longer one is;
  4. the shipped head: the train-split fit, except that truth/info are refit on
     all rows with the same hyperparameters (`--fit_all_honesty`, the GPT-judge
     recipe; the data README: such judges are for TruthfulQA questions only).
Writes <out>/<task>.npz + <task>.json cards and <out>/judges.json (all metrics),
each via temp file + rename, and prints the agreement table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
from typing import Dict, Optional, Sequence

import numpy as np

from h3jax.data.splits import bucket
from h3jax.evaluation.judges import JUDGE_CLASSES, JUDGE_NAMES
from h3jax.evaluation.judges import data as data_lib
from h3jax.evaluation.judges import features as features_lib
from h3jax.evaluation.judges import heads

# Hyperparameter grid searched on the inner validation split (same for every judge).
GRID = tuple(heads.HeadConfig(l2=l2, steps=300, lr=0.05) for l2 in (3e-6, 3e-5, 3e-4))
INNER_VAL_BUCKETS = 20
# Pairwise head variants (`--pairwise_variant`), applied on top of the grid; see `heads` (length control).
PAIRWISE_VARIANTS = {"plain": {}, "length_controlled": dict(length_control=True),
                     "balanced": dict(balance=True),
                     "length_controlled_balanced": dict(length_control=True, balance=True)}
DEFAULT_PAIRWISE_VARIANT = "plain"
CACHE_ENV = "H3JAX_CACHE_DIR"


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "h3jax") / "judge_features"


def _cached_features(rows, fcfg: features_lib.FeatureConfig, key_parts: dict, cache_dir) -> features_lib.Sparse:
  """featurize(rows), memoised on disk under a hash of the config and the data."""
  if cache_dir is None:
    return features_lib.featurize(rows, fcfg)
  blob = json.dumps({"features": fcfg.to_json(), **key_parts, "version": 1}, sort_keys=True)
  path = pathlib.Path(cache_dir) / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npz"
  if path.is_file():
    with np.load(path) as z:
      return features_lib.Sparse(z["ids"], z["vals"], z["rows"], z["dense"])
  x = features_lib.featurize(rows, fcfg)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, ids=x.ids, vals=x.vals, rows=x.rows, dense=x.dense)
  os.replace(tmp, path)
  return x


def _subset(data: data_lib.JudgeData, fraction: float) -> np.ndarray:
  """Example mask keeping keys with bucket('subset|' + key) < 100 * fraction (whole keys)."""
  if fraction >= 1.0:
    return np.ones(len(data), bool)
  return np.asarray([bucket(f"subset|{k}") < 100 * fraction for k in data.keys])


def _fit(x, data, sel: np.ndarray, fcfg, hp):
  """Fits a head on the examples (or pairs) in `sel`; returns params (with length control also the
  trained length weights "length_v", which scoring does not use; see heads.train_pairwise)."""
  if data.pairs is None:
    p, _ = heads.train_pointwise(x.take(np.flatnonzero(sel)), data.y[sel], fcfg.dim, hp)
  else:
    a, b = data.pairs
    p, _ = heads.train_pairwise(x, a[sel], b[sel], data.y[sel], fcfg.dim, hp,
                                length_idx=heads.length_rows(features_lib.DENSE_NAMES))
  return p


def wilson(k: int, n: int, z: float = 1.96) -> tuple:
  """Wilson score interval (lo, hi) of a binomial proportion k / n; (nan, nan) for n = 0."""
  if n == 0:
    return (float("nan"), float("nan"))
  p, d = k / n, 1 + z * z / n
  c = (p + z * z / (2 * n)) / d
  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return (c - h, c + h)


def length_subsets(pred: np.ndarray, label: np.ndarray, longer_wins: np.ndarray) -> dict:
  """Agreement on the pairs where the shorter (or equal-length) answer is preferred, with a Wilson 95% CI
  (chance 50%, "longer wins" 0%), and on the pairs where the longer one is."""
  short = longer_wins != label
  k, n = int((pred == label)[short].sum()), int(short.sum())
  return {"shorter_preferred": {"n": n, "agreement": k / n if n else float("nan"), "ci95": list(wilson(k, n))},
          "longer_preferred": {"n": int((~short).sum()), "agreement": _agreement(pred[~short], label[~short])}}


def _predict(p, x, data, sel: np.ndarray) -> np.ndarray:
  """P(positive) or P(A better) for the examples / pairs in sel."""
  if data.pairs is None:
    s = heads.scores(p, x.take(np.flatnonzero(sel)))
  else:
    s_all = heads.scores(p, x)
    s = s_all[data.pairs[0][sel]] - s_all[data.pairs[1][sel]]
  return 1.0 / (1.0 + np.exp(-s.astype(np.float64)))


def _agreement(pred: np.ndarray, label: np.ndarray) -> float:
  return float(np.mean(pred == label)) if len(label) else float("nan")


def build_judge(task: str, data_root=None, *, fraction: float = 1.0, fit_all_honesty: bool = True,
                cache_dir=None, grid: Sequence[heads.HeadConfig] = GRID,
                pairwise_variant: str = DEFAULT_PAIRWISE_VARIANT, log=print):
  """Trains one judge; returns (judge, metrics dict)."""
  t0 = time.time()
  if pairwise_variant not in PAIRWISE_VARIANTS:
    raise ValueError(f"unknown pairwise_variant {pairwise_variant!r}; expected one of {tuple(PAIRWISE_VARIANTS)}")
  if task == "pairwise":
    grid = [dataclasses.replace(hp, **PAIRWISE_VARIANTS[pairwise_variant]) for hp in grid]
  data = data_lib.load_judge_data(task, data_root)
  keep = _subset(data, fraction)
  fcfg = features_lib.FeatureConfig(fields=data.fields)
  data = _restrict(data, keep)
  x = _cached_features(data.rows, fcfg, {"task": task, "sources": data.sources, "fraction": fraction}, cache_dir)
  keep = np.ones(len(data), bool)
  train, held = keep & data.train, keep & ~data.train
  inner = np.asarray([bucket(f"judge-val|{k}") < INNER_VAL_BUCKETS for k in data.keys])
  fit_sel, val_sel = train & ~inner, train & inner & data.scored
  best, best_acc = None, -1.0
  for hp in grid:
    acc = _agreement(_predict(_fit(x, data, fit_sel, fcfg, hp), x, data, val_sel) > 0.5, data.label[val_sel])
    log(f"  {task}: l2={hp.l2:g} hidden={hp.hidden} inner-val agreement {acc:.4f}")
    if acc > best_acc:
      best, best_acc = hp, acc
  p = _fit(x, data, train, fcfg, best)
  ev = held & data.scored
  label = data.label[ev]
  prob = _predict(p, x, data, ev)
  majority = bool(np.mean(data.label[train & data.scored]) >= 0.5)
  metrics = {
      "n_train": int(train.sum()), "n_eval": int(ev.sum()), "agreement": _agreement(prob > 0.5, label),
      "baselines": {"majority_class": _agreement(np.full(len(label), majority), label),
                    **{k: _agreement(v[ev], label) for k, v in data.baselines.items()}},
      "positive_rate_eval": float(label.mean()) if len(label) else float("nan"),
      "inner_val_agreement": best_acc, "fraction": fraction,
  }
  if data.groups is not None:
    metrics["per_generator"] = _per_generator(data, ev, prob)
  if "longer_wins" in data.baselines:
    metrics["length_subsets"] = length_subsets(prob > 0.5, label, data.baselines["longer_wins"][ev])
    metrics["variant"] = pairwise_variant
  fit = "train"
  if fit_all_honesty and task in ("truth", "info"):
    p, fit = _fit(x, data, keep, fcfg, best), "all"
  length_v = p.pop("length_v", None)
  card = {"task": task, "features": fcfg.to_json(), "head": best.to_json(), "fit": fit,
          "data": data.sources, "split": "bucket(key) < 50 train (data README); pairwise: SFT-train instructions",
          "metrics": metrics, "seconds": round(time.time() - t0, 1)}
  if length_v is not None:  # trained on standardised features, then zeroed in the shipped head
    names = [features_lib.DENSE_NAMES[i] for i in heads.length_rows(features_lib.DENSE_NAMES)]
    card["length_weights_dropped"] = {nm: float(v) for nm, v in zip(names, np.asarray(length_v)[:, 0])}
  return JUDGE_CLASSES[task](p, card), metrics


def _ranks(v: np.ndarray) -> np.ndarray:
  return np.argsort(np.argsort(v)).astype(np.float64)


def _per_generator(data: data_lib.JudgeData, ev: np.ndarray, prob: np.ndarray) -> dict:
  """Held-out win rate of each generator against the reference: by the judge and by GPT-4.

  The data README's sanity check: the judge should rank the stored models like the
  GPT-4 annotator does (Spearman rank correlation of the two win rates, no ties handling).
  """
  gens = data.groups[ev]
  in_a = data.group_in_a[ev]  # the generator sits in slot A when the order coin swapped the pair
  p_gen = np.where(in_a, prob, 1 - prob)
  y_gen = np.where(in_a, data.y[ev], 1 - data.y[ev])
  out = {g: {"judge": float(p_gen[gens == g].mean()), "gpt4": float(y_gen[gens == g].mean()),
             "n": int((gens == g).sum())} for g in sorted(set(gens.tolist()))}
  j = np.asarray([v["judge"] for v in out.values()])
  t = np.asarray([v["gpt4"] for v in out.values()])
  rj, rt = _ranks(j), _ranks(t)
  rho = float(np.corrcoef(rj, rt)[0, 1]) if len(j) > 1 else float("nan")
  return {"win_rate": out, "spearman": rho}


def _restrict(data: data_lib.JudgeData, keep: np.ndarray) -> data_lib.JudgeData:
  """The examples (pairs) in keep, with only the rows they use, re-indexed."""
  idx = np.flatnonzero(keep)
  pairs, rows = None, np.arange(len(data.rows))
  if data.pairs is not None:
    a, b = data.pairs[0][idx], data.pairs[1][idx]
    rows = np.unique(np.concatenate([a, b]))
    pairs = (np.searchsorted(rows, a), np.searchsorted(rows, b))
  else:
    rows = idx
  return data_lib.JudgeData(
      data.task, data.fields, [data.rows[i] for i in rows], [data.keys[i] for i in idx], data.y[idx],
      data.label[idx], data.train[idx], {k: v[idx] for k, v in data.baselines.items()}, data.scored[idx],
      data.sources, pairs, *(None if v is None else v[idx] for v in (data.groups, data.group_in_a)))


def format_table(metrics: Dict[str, dict]) -> str:
  lines = ["| judge | n_train | n_eval | agreement | majority class | other baseline |",
           "|---|---|---|---|---|---|"]
  for task, m in metrics.items():
    other = ", ".join(f"{k} {v:.3f}" for k, v in m["baselines"].items() if k != "majority_class") or "-"
    lines.append(f"| {task} | {m['n_train']} | {m['n_eval']} | {m['agreement']:.3f} | "
                 f"{m['baselines']['majority_class']:.3f} | {other} |")
  for task, m in metrics.items():
    if "length_subsets" in m:
      sp, lp = m["length_subsets"]["shorter_preferred"], m["length_subsets"]["longer_preferred"]
      lines.append(f"\n{task} ({m.get('variant')}): held-out agreement where the shorter answer is preferred "
                   f"{sp['agreement']:.3f} (95% CI {sp['ci95'][0]:.3f}-{sp['ci95'][1]:.3f}, n={sp['n']}; "
                   f"chance 0.5, longer wins 0), where the longer one is {lp['agreement']:.3f} (n={lp['n']})")
  for task, m in metrics.items():
    if "per_generator" in m:
      wr = m["per_generator"]["win_rate"]
      lines.append(f"\n{task}: held-out win rate vs {data_lib.REFERENCE_GENERATOR}, judge / GPT-4 "
                   f"(Spearman {m['per_generator']['spearman']:.2f}): "
                   + ", ".join(f"{g} {v['judge']:.3f}/{v['gpt4']:.3f}" for g, v in wr.items()))
  return "\n".join(lines)


def build_judges(out_dir, data_root=None, *, only: Optional[Sequence[str]] = None, fraction: float = 1.0,
                 fit_all_honesty: bool = True, cache_dir="default", grid: Sequence[heads.HeadConfig] = GRID,
                 pairwise_variant: str = DEFAULT_PAIRWISE_VARIANT, log=print) -> Dict[str, dict]:
  """Builds the judges in `only` (default all) into out_dir; returns {task: metrics}."""
  tasks = list(only or JUDGE_NAMES)
  bad = [t for t in tasks if t not in JUDGE_NAMES]
  if bad:
    raise ValueError(f"unknown judges {bad}; expected a subset of {JUDGE_NAMES}")
  if pairwise_variant not in PAIRWISE_VARIANTS:
    raise ValueError(f"unknown pairwise_variant {pairwise_variant!r}; expected one of {tuple(PAIRWISE_VARIANTS)}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  summary_path = out / "judges.json"
  summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
  metrics = {}
  for task in tasks:
    log(f"building judge {task!r}")
    judge, metrics[task] = build_judge(task, data_root, fraction=fraction, fit_all_honesty=fit_all_honesty,
                                       cache_dir=cache_dir, grid=grid, pairwise_variant=pairwise_variant, log=log)
    judge.save(out)
    summary[task] = dict(metrics[task], fit=judge.card["fit"], head=judge.card["head"])
  tmp = out / ".judges.json.tmp"
  tmp.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
  os.replace(tmp, summary_path)
  log(format_table(metrics))
  return metrics


if __name__ == "__main__":  # `python -m h3jax.evaluation.judges.train`: the command is h3jax/cli/judges.py
  from h3jax.cli import judges as _cli
  _cli.run()
