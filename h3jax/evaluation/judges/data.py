"""Labelled judge data from the data root, split by the data README's hash rule, with baselines.

  refusal   xstest/xstest_v2_completions_labelled.jsonl: label = final_label is a full or
            partial refusal; key = the prompt text of xstest_prompts.jsonl (joined by id);
            baseline: XSTest's own string-match classifier (`strmatch_label`).
  truth     truthfulqa_judge/finetune_truth.jsonl: "Q: ...\\nA: ...\\nTrue:" -> " yes"/" no";
  info      truthfulqa_judge/finetune_info.jsonl ("Helpful:"); key = question.strip().
  pairwise  alpaca_eval preferences (GPT-4-turbo, weighted): generator_1 = gpt4_1106_preview
            vs one of the 7 other models with stored outputs; P(generator_2 better) =
            preference - 1. Key: the instruction; train = SFT-train instructions
            (bucket < 50 and idx >= 50), the rest is held out. A deterministic coin
            (hash of idx|generator_2) orders each held-out pair as (A, B), so the
            "majority class" baseline cannot exploit the fixed generator_1 slot.
            Baseline: the longer answer wins.
Every example carries its split key; `train` is bucket(key) < 50.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Tuple

import numpy as np

from h3jax.data import sources
from h3jax.data.splits import bucket, is_train_key

REFUSAL_LABELS = ("2_full_refusal", "3_partial_refusal")
REFERENCE_GENERATOR = "gpt4_1106_preview"
PAPER_HELPFUL_EVAL = 50  # AlpacaEval idx 0..49 are always eval
_QA = re.compile(r"^Q: (.*?)\nA: (.*)\n(?:True|Helpful):\s*$", re.S)


@dataclasses.dataclass
class JudgeData:
  """Examples of one judge. Pointwise: one per row. Pairwise: `pairs` index rows (A, B)."""
  task: str
  fields: Tuple[str, ...]
  rows: list  # tuples of field texts
  keys: list  # split key per example (per pair when pairwise)
  y: np.ndarray  # soft target per example / pair: P(positive) or P(A better)
  label: np.ndarray  # hard label (bool) per example / pair
  train: np.ndarray  # bool per example / pair
  baselines: Dict[str, np.ndarray]  # name -> bool prediction per example / pair
  scored: np.ndarray  # bool: counts toward agreement (pairwise: drops exact ties)
  sources: Dict[str, str]  # source name -> sha256 of the file (or hub id)
  pairs: Optional[Tuple[np.ndarray, np.ndarray]] = None
  groups: Optional[np.ndarray] = None  # pairwise: the non-reference generator of each pair
  group_in_a: Optional[np.ndarray] = None  # pairwise: that generator is response A

  def __len__(self):
    return len(self.keys)


def source_hashes(names, data_root) -> Dict[str, str]:
  root = sources.resolve_data_root(data_root)
  if root is None:
    return {n: "hub" for n in names}
  return {n: sources.sha256_file(sources.source_path(n, data_root)) for n in names}


def refusal_data(data_root=None) -> JudgeData:
  prompts = {r["id"]: r["prompt"] for r in sources.load_source("xstest_prompts", data_root).to_list()}
  comps = sources.load_source("xstest_completions", data_root).to_list()
  rows, keys, label, strmatch = [], [], [], []
  for i, r in enumerate(comps):
    pid = int(re.sub(r"^v2-", "", str(r["id"])))
    if pid not in prompts:
      raise ValueError(f"xstest completion row {i + 1} has id {r['id']!r} with no prompt in xstest_prompts.jsonl")
    rows.append((r["prompt"], r["completion"] or ""))
    keys.append(prompts[pid])
    label.append(r["final_label"] in REFUSAL_LABELS)
    strmatch.append(r.get("strmatch_label") in REFUSAL_LABELS)
  label = np.asarray(label)
  return JudgeData("refusal", ("prompt", "response"), rows, keys, label.astype(np.float32), label,
                   np.asarray([is_train_key(k) for k in keys]), {"string_match": np.asarray(strmatch)},
                   np.ones(len(keys), bool), source_hashes(("xstest_prompts", "xstest_completions"), data_root))


def truthfulqa_judge_data(task: str, data_root=None) -> JudgeData:
  if task not in ("truth", "info"):
    raise ValueError(f"task must be 'truth' or 'info', got {task!r}")
  name = f"truthfulqa_judge_{task}"
  rows, keys, label = [], [], []
  for i, r in enumerate(sources.load_source(name, data_root).to_list()):
    m = _QA.match(r["prompt"])
    if m is None:
      raise ValueError(f"{name} row {i + 1}: prompt is not 'Q: ...\\nA: ...\\nTrue:|Helpful:': {r['prompt'][:80]!r}")
    answer = r["completion"].strip()
    if answer not in ("yes", "no"):
      raise ValueError(f"{name} row {i + 1}: completion must be ' yes' or ' no', got {r['completion']!r}")
    rows.append((m.group(1), m.group(2)))
    keys.append(m.group(1).strip())
    label.append(answer == "yes")
  label = np.asarray(label)
  return JudgeData(task, ("q", "a"), rows, keys, label.astype(np.float32), label,
                   np.asarray([is_train_key(k) for k in keys]), {}, np.ones(len(keys), bool),
                   source_hashes((name,), data_root))


def _coin(idx: int, generator: str) -> bool:
  return bucket(f"pair-order|{idx}|{generator}") % 2 == 1


def pairwise_data(data_root=None) -> JudgeData:
  instr = {r["idx"]: r["instruction"] for r in sources.load_source("alpaca_eval_instructions", data_root).to_list()}
  outputs = {(r["idx"], r["generator"]): r["output"]
             for r in sources.load_source("alpaca_eval_outputs", data_root).to_list()}
  prefs = sources.load_source("alpaca_eval_preferences", data_root).to_list()
  doc: Dict[tuple, int] = {}
  rows, keys, a_idx, b_idx, y, train, groups, in_a = [], [], [], [], [], [], [], []

  def doc_index(idx, gen):
    if (idx, gen) not in doc:
      doc[(idx, gen)] = len(rows)
      rows.append((instr[idx], outputs[(idx, gen)]))
    return doc[(idx, gen)]

  for r in prefs:
    idx, g1, g2 = r["idx"], r["generator_1"], r["generator_2"]
    if g2 == g1 or (idx, g1) not in outputs or (idx, g2) not in outputs:
      continue  # self-comparisons, and models without stored text
    if idx not in instr:
      raise ValueError(f"alpaca_eval preference for idx {idx} has no instruction")
    p2 = float(r["preference"]) - 1.0  # P(generator_2 better)
    is_train = idx >= PAPER_HELPFUL_EVAL and is_train_key(instr[idx])
    first, second, p_first = (g1, g2, 1.0 - p2)
    if not is_train and _coin(idx, g2):  # held out: order by a fixed coin
      first, second, p_first = g2, g1, p2
    a_idx.append(doc_index(idx, first))
    b_idx.append(doc_index(idx, second))
    y.append(p_first)
    keys.append(instr[idx])
    train.append(is_train)
    groups.append(g2)
    in_a.append(first == g2)
  if not keys:
    raise ValueError("no AlpacaEval preference rows with stored outputs for both generators")
  a_idx, b_idx, y = np.asarray(a_idx), np.asarray(b_idx), np.asarray(y, np.float32)
  lengths = np.asarray([len(r[1]) for r in rows])
  return JudgeData("pairwise", ("instruction", "response"), rows, keys, y, y > 0.5, np.asarray(train),
                   {"longer_wins": lengths[a_idx] > lengths[b_idx]}, y != 0.5,
                   source_hashes(("alpaca_eval_instructions", "alpaca_eval_outputs", "alpaca_eval_preferences"),
                                 data_root), pairs=(a_idx, b_idx), groups=np.asarray(groups),
                   group_in_a=np.asarray(in_a))


def load_judge_data(task: str, data_root=None) -> JudgeData:
  if task == "refusal":
    return refusal_data(data_root)
  if task in ("truth", "info"):
    return truthfulqa_judge_data(task, data_root)
  if task == "pairwise":
    return pairwise_data(data_root)
  raise ValueError(f"unknown judge {task!r}; expected refusal, truth, info or pairwise")
