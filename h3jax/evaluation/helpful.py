"""Helpfulness: win rate against stored reference outputs by a pairwise judge.

Eval instructions are the AlpacaEval eval split (`h3jax.data.splits`): the 433
held-out instructions, or with subset="paper" the 50 the H^3Fusion paper
scores (idx 0..49). References are the stored `text_davinci_003` outputs
(AlpacaEval 1.0 baseline, the paper's) and `gpt4_1106_preview` (AlpacaEval 2.0
baseline; also the SFT teacher, so winning against it partly measures
closeness to the teacher).

The judge is asked both ways round and the two answers averaged,
p = (prefer(x, model, ref) + 1 - prefer(x, ref, model)) / 2, which cancels a
judge's position bias. Reported per reference: the raw win rate and the
length-controlled one (`metrics.length_controlled_win_rate`).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from h3jax.data import splits
from h3jax.evaluation import metrics

REFERENCES = ("text_davinci_003", "gpt4_1106_preview")


def alpaca_eval(data_root=None, *, subset: str = "full",
                references: Sequence[str] = REFERENCES) -> List[dict]:
  """Eval-split items {"id", "prompt", "set", "refs": {generator: output}}."""
  refs = {g: splits.reference_outputs(g, data_root) for g in references}
  out = []
  for r in splits.helpfulness("eval", data_root, subset=subset):
    idx = r["meta"]["idx"]
    missing = [g for g in references if idx not in refs[g]]
    if missing:
      raise ValueError(f"AlpacaEval idx {idx} has no stored output for {missing} in model_outputs.jsonl")
    out.append({"id": f"alpaca_eval-{idx}", "prompt": r["instruction"], "set": "alpaca_eval",
                "refs": {g: refs[g][idx] for g in references}})
  return out


def symmetric_preference(judge, instructions, outputs, references) -> np.ndarray:
  """P(output beats reference), averaged over both presentation orders."""
  ab = np.asarray(judge.prefer(list(instructions), list(outputs), list(references)), np.float64)
  ba = np.asarray(judge.prefer(list(instructions), list(references), list(outputs)), np.float64)
  return 0.5 * (ab + 1.0 - ba)


def win_rate_metrics(judge, items: List[dict], outputs: List[str],
                     references: Sequence[str] = REFERENCES) -> Dict[str, dict]:
  """{f"win_rate_{ref}", f"lc_win_rate_{ref}"} for each reference generator."""
  out, per_item = {}, {}
  instr = [it["prompt"] for it in items]
  for g in references:
    refs = [it["refs"][g] for it in items]
    p = symmetric_preference(judge, instr, outputs, refs)
    out[f"win_rate_{g}"] = metrics.win_rate(p)
    out[f"lc_win_rate_{g}"] = metrics.length_controlled_win_rate(p, [len(o) for o in outputs],
                                                                 [len(r) for r in refs])
    per_item[g] = p.tolist()
  out["per_item"] = per_item
  return out
