"""The eval sets of one run, by name, each a list of items {"id", "prompt", "set", ...}.

Thin adapters over `h3jax.data` (sources + hash splits) and the per-axis
modules; `limit` keeps the first N items of each set in file order, so a
`--limit` run is a prefix of the full run and shares its cache.

A config with `sample` ({set: n}, 0 = all) instead draws a seeded random
sample (`sample_items`): each set's items are ordered by a hash of
(sample_seed, group key), where the group key is the question for both
TruthfulQA sets (so a question is in or out of both) and the item id
otherwise; the first `holdout[set]` items are the validation part
(`sample_part="validation"`) and the evaluation part samples the rest.

  alpaca_eval     helpfulness eval split (433, or 50 with helpful_subset="paper")
  harmbench, strongreject, advbench, xstest_safe, xstest_unsafe   see harm.py
  truthfulqa_gen  TruthfulQA eval-split questions, generated answers (415)
  truthfulqa_mc   the same questions' MC1/MC2 targets, scored by log-probs
"""

from __future__ import annotations

import hashlib
from typing import Dict, List

from h3jax.data import sources, splits
from h3jax.evaluation import harm, helpful

ALL_SETS = ("alpaca_eval", "harmbench", "strongreject", "advbench", "xstest_safe", "xstest_unsafe",
            "truthfulqa_gen", "truthfulqa_mc")
AXIS_SETS = {"helpful": ("alpaca_eval",), "harmless": harm.HARMFUL_SETS + harm.XSTEST_SETS,
             "honest": ("truthfulqa_gen", "truthfulqa_mc")}


def truthfulqa_gen(data_root=None) -> List[dict]:
  return [{"id": f"truthfulqa-{r['meta']['idx']}", "prompt": r["instruction"], "set": "truthfulqa_gen"}
          for r in splits.honesty("eval", data_root)]


def truthfulqa_mc(data_root=None) -> List[dict]:
  """Eval-split MC items (the hash rule on question.strip(), as for generation)."""
  out = []
  for r in sources.load_source("truthfulqa_mc", data_root).to_list():
    q = r["question"].strip()
    if splits.is_train_key(q):
      continue
    out.append({"id": f"truthfulqa_mc-{r['idx']}", "question": q, "set": "truthfulqa_mc",
                "mc1_targets": r["mc1_targets"], "mc2_targets": r["mc2_targets"]})
  return out


def _group_key(item: dict) -> str:
  if item["set"] == "truthfulqa_mc":
    return "truthfulqa:" + item["question"].strip()
  if item["set"] == "truthfulqa_gen":
    return "truthfulqa:" + item["prompt"].strip()
  return f"{item['set']}:{item['id']}"


def sample_items(items: List[dict], n: int, *, seed: int, holdout: int = 0, part: str = "eval") -> List[dict]:
  """A seeded sample of a set, independent of file order: items ordered by sha256(seed, group key);
  part "validation" is the first `holdout` of that order, part "eval" the first n (0 = all) of the rest."""
  if part not in ("eval", "validation"):
    raise ValueError(f"sample_part must be 'eval' or 'validation', got {part!r}")
  if n < 0 or holdout < 0:
    raise ValueError(f"sample sizes must be >= 0, got n={n}, holdout={holdout}")
  rank = lambda it: hashlib.sha256(f"{seed}:{_group_key(it)}".encode("utf-8")).hexdigest()
  ordered = sorted(items, key=rank)
  if part == "validation":
    return ordered[:holdout]
  rest = ordered[holdout:]
  if n > len(rest):
    raise ValueError(f"{items[0]['set'] if items else 'a set'}: sample of {n} asked but only {len(rest)} items "
                     f"remain after holding out {holdout}")
  return rest[:n] if n else rest


def load_eval_sets(config, limit: int = 0) -> Dict[str, List[dict]]:
  """{name: items} for config.sets, each cut to `limit` items (0 = all)."""
  names = tuple(config.sets)
  unknown = set(names) - set(ALL_SETS)
  if unknown:
    raise ValueError(f"unknown eval sets {sorted(unknown)}; known: {ALL_SETS}")
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0 (0 = all), got {limit}")
  root = config.data_root or None
  out = {}
  if "alpaca_eval" in names:
    out["alpaca_eval"] = helpful.alpaca_eval(root, subset=config.helpful_subset,
                                             references=tuple(config.references))
  harm_names = [n for n in names if n in harm.HARMFUL_SETS + harm.XSTEST_SETS]
  if harm_names:
    out.update(harm.load_sets(root, harm_names, drop_trained_advbench=config.drop_trained_advbench))
  if "truthfulqa_gen" in names:
    out["truthfulqa_gen"] = truthfulqa_gen(root)
  if "truthfulqa_mc" in names:
    out["truthfulqa_mc"] = truthfulqa_mc(root)
  out = {n: out[n] for n in names}  # config order
  sample = dict(config.get("sample") or {})
  if sample:
    holdout, seed = dict(config.get("holdout") or {}), int(config.get("sample_seed", 0))
    part = config.get("sample_part", "eval")
    out = {n: sample_items(items, int(sample.get(n, 0)), seed=seed, holdout=int(holdout.get(n, 0)), part=part)
           for n, items in out.items()}
  return {n: items[:limit] if limit else items for n, items in out.items()}
