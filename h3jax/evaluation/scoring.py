"""Scoring one model: generate (cached), judge (cached), MC log-probs (cached), metrics and samples.

  metrics, samples, skipped, timings = score_model(model, sets, config, judges, store)

Judge calls go through `CachedJudge`, so an interrupted or re-run evaluation
never re-asks a judge (which matters for an HTTP judge) about a (prompt,
response) it has scored before; a judge with `cache_every` (the HTTP judge:
every item) has its answers persisted that often, so a failed request loses
no earlier answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Dict, List

import numpy as np

from h3jax.evaluation import cache as cache_lib
from h3jax.evaluation import harm, helpful, infer, truthfulqa
from h3jax.evaluation.metrics import summary


def _judge(judges, name):
  if judges is None:
    return None
  return judges.get(name) if isinstance(judges, dict) else getattr(judges, name, None)


def _judge_id(judge) -> str:
  """What identifies a judge's answers: its card (local weights and data hashes) or endpoint."""
  desc = {"type": type(judge).__qualname__, "card": getattr(judge, "card", None),
          "url": getattr(judge, "url", None), "model": getattr(judge, "model", None)}
  return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CachedJudge:
  """A judge whose score/prefer answers are stored per row in the model's cache."""

  def __init__(self, judge, name: str, store: cache_lib.Cache):
    self.judge, self.name, self.store, self.ident = judge, name, store, _judge_id(judge)

  @property
  def metrics(self):
    return getattr(self.judge, "metrics", None)

  def score(self, *fields):
    return self._cached("score", fields)

  def prefer(self, *fields):
    return self._cached("prefer", fields)

  def _cached(self, method: str, fields) -> np.ndarray:
    rows = list(zip(*fields))
    keys = [cache_lib.item_key("judge", [self.name, method, *r], {"judge": self.ident}) for r in rows]
    todo = list({k: i for i, k in enumerate(keys) if k not in self.store}.values())
    # A judge that answers item by item (HTTP: one request each) says how often to persist, so a failure
    # at request k keeps the answers before it; local judges answer everything in one call.
    step = max(1, int(getattr(self.judge, "cache_every", 0) or len(todo) or 1))
    for s in range(0, len(todo), step):
      part = todo[s:s + step]
      t0, c0 = time.time(), time.process_time()
      vals = getattr(self.judge, method)(*[[f[i] for i in part] for f in fields])
      dt, dc = time.time() - t0, time.process_time() - c0
      self.store.put_many([(keys[i], "judge", float(v), {"judge": self.name}) for i, v in zip(part, vals)]
                          + [cache_lib.time_row("judge", dt, len(part), dc)])
    return np.asarray([self.store.get(k) for k in keys], np.float64)


def _flat(prefix: str, ms: dict) -> dict:
  return {f"{prefix}/{k}": v for k, v in ms.items() if k != "per_item"}


def generation_sets(sets: Dict[str, List[dict]]) -> List[str]:
  """The sets answered by generation. They run in one pass: batches sorted by prompt length
  span sets, so fewer shapes compile."""
  return [n for n, items in sets.items() if n != "truthfulqa_mc" and items]


def generate_shard(model: dict, sets: Dict[str, List[dict]], config, store, shard, *, progress=True) -> int:
  """Only the missing generations of part shard = (i, n) (`infer.in_shard`); no MC, no judges.
  Returns how many responses of this part are now cached."""
  settings = infer.generation_settings(config, infer.prompt_template(config, model["tokenizer"]))
  items = [it for n in generation_sets(sets) for it in sets[n]]
  outs = infer.generate_cached(model, items, settings, store, batch_size=int(config.batch_size),
                               desc=f"{model['name']}: generate {shard[0]}/{shard[1]}", progress=progress,
                               shard=shard)
  return sum(o is not None for o in outs)


def score_model(model: dict, sets: Dict[str, List[dict]], config, judges, store, *, progress=True):
  """Generates what is missing and scores; returns (metrics, samples, skipped, timings this run)."""
  template = infer.prompt_template(config, model["tokenizer"])
  settings = infer.generation_settings(config, template)
  bs = int(config.batch_size)
  metrics, samples, skipped, timings, mc_samples = {}, [], [], {}, []
  # MC first: its few minutes give the honesty MC numbers early in a long run.
  if sets.get("truthfulqa_mc"):
    t0 = time.time()
    items = sets["truthfulqa_mc"]
    s1, s2 = infer.mc_cached(model, items, config.mc_format, template, store, batch_size=bs,
                             system=settings["system"], progress=progress)
    ms = truthfulqa.mc_metrics(items, s1, s2)
    metrics.update(_flat("honest", ms))
    mc_samples = [{"id": it["id"], "set": "truthfulqa_mc", "mc1": a, "mc2": b}
                  for it, a, b in zip(items, ms["per_item"]["mc1"], ms["per_item"]["mc2"])]
    timings["mc"] = round(time.time() - t0, 2)
  gen_names = generation_sets(sets)
  t0 = time.time()
  flat, flat_cut = infer.generate_cached(model, [it for n in gen_names for it in sets[n]], settings, store,
                                         batch_size=bs, desc=f"{model['name']}: generate", progress=progress,
                                         return_cut=True)
  timings["generate"] = round(time.time() - t0, 2)
  responses, cuts, k = {}, {}, 0
  for n in gen_names:
    responses[n], cuts[n], k = flat[k:k + len(sets[n])], flat_cut[k:k + len(sets[n])], k + len(sets[n])
  known = [c for c in flat_cut if c is not None]
  if known:  # answers that hit max_new_tokens: the judges saw them unfinished
    metrics["generation/cut_rate"] = summary(np.asarray(known, np.float64))
  cached = {n: CachedJudge(j, n, store) for n in ("refusal", "pairwise", "truth", "info")
            if (j := _judge(judges, n)) is not None}
  refusal, pairwise = cached.get("refusal"), cached.get("pairwise")
  truth, info = cached.get("truth"), cached.get("info")
  t0 = time.time()
  harm_sets = {}
  for name, outs in responses.items():
    items = sets[name]
    # Judges see the reply without surrounding whitespace (the Alpaca template's reply starts with
    # "\n"; the judges were trained on clean replies, and the paper strips outputs too).
    outs = [o.strip() for o in outs]
    rows = [{"id": it["id"], "set": name, "prompt": it["prompt"], "response": o, "cut": c}
            for it, o, c in zip(items, outs, cuts[name])]
    if name == "alpaca_eval":
      if pairwise is None:
        skipped.append("helpful: no pairwise judge")
      else:
        ms = helpful.win_rate_metrics(pairwise, items, outs, tuple(config.references))
        metrics.update(_flat("helpful", ms))
        for g, ps in ms["per_item"].items():
          for r, p in zip(rows, ps):
            r[f"p_win_{g}"] = p
    elif name == "truthfulqa_gen":
      if truth is None or info is None:
        skipped.append("honest/truthful, informative: no truth/info judge")
      else:
        qs = [it["prompt"] for it in items]
        ms = truthfulqa.truth_info_metrics(truth.score(qs, outs), info.score(qs, outs), config.threshold)
        metrics.update(_flat("honest", ms))
        for r, t, i in zip(rows, ms["per_item"]["truthful"], ms["per_item"]["informative"]):
          r.update(truthful=t, informative=i)
    else:
      if refusal is None:
        skipped.append(f"harmless/{name}: no refusal judge")
      else:
        p = np.asarray(refusal.score([it["prompt"] for it in items], outs), np.float64)
        harm_sets[name] = harm.set_metrics(name, p, config.threshold)
        metrics.update(_flat(f"harmless/{name}", harm_sets[name]))
        for r, v in zip(rows, p):
          r["p_refusal"] = float(v)
    samples += rows
  samples += mc_samples
  if any(n in harm_sets for n in harm.HARMFUL_SETS):
    metrics["harmless/compliance_rate"] = harm.pooled_compliance(harm_sets)
  timings["judge"] = round(time.time() - t0, 2)
  return metrics, samples, skipped, timings


def axis_scores(metrics: dict, axis_metrics) -> dict:
  """{axis: score in [0, 1], higher better}; a '1-' prefix flips a lower-is-better metric."""
  out = {}
  for axis, spec in axis_metrics.items():
    flip = spec.startswith("1-")
    m = metrics.get(spec[2:] if flip else spec)
    out[axis] = None if m is None or not math.isfinite(m["value"]) else (1 - m["value"] if flip else m["value"])
  return out
