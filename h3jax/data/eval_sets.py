"""Evaluation-only sets and judge-training data, split by the data README's rules.

Prompt sets return items {"id", "prompt", "set", ...} (the schema of
`h3jax.evaluation`); labelled judge data returns rows with a `key` (the hash
split key) and `split` ("train" | "eval"). Counts from the data README:

  truthfulqa_mc("eval")              415 questions with mc1/mc2 targets
  harmbench("test")                  240 (standard + contextual); "val": 80 rows, all categories
  strongreject() 313, donotanswer() 939
  advbench()                         403 (520 minus the 117 goals in refusal_direction/harmful_train)
  xstest("safe") 250, xstest("unsafe") 200
  alpaca_eval_references(g)          {idx: output} on the 433 eval instructions (50 with subset="paper")
  xstest_judge(split)                train 1,195 rows (239 prompts x 5 models), eval 1,055
  truthfulqa_judge(kind, split)      train 11,066, eval 11,368 (kind: "truth" | "info")
  alpaca_preferences(split)          text-bearing, non-self pairs: train 2,604, eval 3,031
"""

from __future__ import annotations

import re
from typing import Dict, List

from h3jax.data import sources
from h3jax.data import splits

HARMBENCH_TEST_CATEGORIES = ("standard", "contextual")
PREFERENCE_REFERENCE = "gpt4_1106_preview"  # generator_1 of every preference row
_QA = re.compile(r"^Q: (.*?)\nA:", re.S)


def norm(text: str) -> str:
  """Case- and whitespace-normalised text, the README's rule for matching prompts across sets."""
  return " ".join(text.lower().split())


def _split_of(key: str) -> str:
  return "train" if splits.is_train_key(key) else "eval"


def _check(split, allowed=("train", "eval")):
  if split not in allowed:
    raise ValueError(f"split must be one of {allowed}, got {split!r}")


def truthfulqa_mc(split: str = "eval", data_root=None) -> List[dict]:
  """TruthfulQA MC1/MC2 items; the split key is question.strip(), as for generation."""
  _check(split)
  return [{"id": f"truthfulqa_mc-{r['idx']}", "prompt": r["question"].strip(), "set": "truthfulqa_mc",
           "key": r["question"].strip(), "mc1_targets": r["mc1_targets"], "mc2_targets": r["mc2_targets"]}
          for r in sources.load_source("truthfulqa_mc", data_root).to_list()
          if _split_of(r["question"].strip()) == split]


def harmbench(split: str = "test", data_root=None) -> List[dict]:
  """test: standard + contextual behaviours (contextual shown as context, "---", behaviour); val: all."""
  _check(split, ("test", "val"))
  out = []
  for r in sources.load_source("harmbench", data_root).to_list():
    if r["split"] != split or (split == "test" and r["functional_category"] not in HARMBENCH_TEST_CATEGORIES):
      continue
    prompt = r["behavior"]
    if r["context_string"]:
      prompt = f"{r['context_string']}\n\n---\n\n{r['behavior']}"
    out.append({"id": r["behavior_id"], "prompt": prompt, "set": "harmbench",
                "category": r["functional_category"], "semantic_category": r.get("semantic_category")})
  return out


def strongreject(data_root=None) -> List[dict]:
  return [{"id": f"strongreject-{r['idx']}", "prompt": r["forbidden_prompt"], "set": "strongreject",
           "category": r["category"]} for r in sources.load_source("strongreject", data_root).to_list()]


def donotanswer(data_root=None) -> List[dict]:
  return [{"id": f"donotanswer-{r['idx']}", "prompt": r["prompt"], "set": "donotanswer",
           "category": r["risk_area"]} for r in sources.load_source("donotanswer", data_root).to_list()]


def advbench(data_root=None, *, drop_trained: bool = True) -> List[dict]:
  """AdvBench goals, minus (drop_trained) those in the refusal-style SFT pool, compared normalised."""
  seen = set()
  if drop_trained:
    seen = {norm(t) for t in sources.load_source("refusal_direction_harmful_train", data_root)["instruction"]}
  return [{"id": f"advbench-{r['idx']}", "prompt": r["goal"], "set": "advbench"}
          for r in sources.load_source("advbench", data_root).to_list() if norm(r["goal"]) not in seen]


def xstest(label: str, data_root=None) -> List[dict]:
  """XSTest prompts: label "safe" (over-refusal set) or "unsafe" (contrast prompts)."""
  _check(label, ("safe", "unsafe"))
  return [{"id": f"xstest-{r['id']}", "prompt": r["prompt"], "set": f"xstest_{label}", "type": r["type"]}
          for r in sources.load_source("xstest_prompts", data_root).to_list() if r["label"] == label]


def alpaca_eval_references(generator: str, data_root=None, *, subset: str = "full") -> Dict[int, str]:
  """{idx: stored output of `generator`} on the helpfulness eval instructions."""
  refs = splits.reference_outputs(generator, data_root)
  idxs = [r["meta"]["idx"] for r in splits.helpfulness("eval", data_root, subset=subset)]
  missing = [i for i in idxs if i not in refs]
  if missing:
    raise ValueError(f"AlpacaEval: no stored {generator} output for eval idx {missing[:5]}")
  return {i: refs[i] for i in idxs}


def xstest_judge(split: str, data_root=None) -> List[dict]:
  """Labelled completions; key = the prompts file's text for the row's id (`v2-N` <-> N)."""
  _check(split)
  prompts = {r["id"]: r["prompt"] for r in sources.load_source("xstest_prompts", data_root).to_list()}
  out = []
  for line, r in enumerate(sources.load_source("xstest_completions", data_root).to_list(), 1):
    m = re.fullmatch(r"v2-(\d+)", str(r["id"]))
    if not m or int(m.group(1)) not in prompts:
      raise ValueError(f"xstest_v2_completions_labelled.jsonl row {line}: id {r['id']!r} matches no "
                       "xstest_prompts.jsonl id (expected 'v2-N')")
    key = prompts[int(m.group(1))]
    if _split_of(key) == split:
      out.append({"id": r["id"], "model": r["model"], "prompt": r["prompt"], "completion": r["completion"] or "",
                  "final_label": r["final_label"], "strmatch_label": r.get("strmatch_label"),
                  "gpt4_label": r.get("gpt4_label"), "key": key, "split": split})
  return out


def truthfulqa_judge(kind: str, split: str, data_root=None) -> List[dict]:
  """GPT-judge ("truth") / GPT-info ("info") rows; label = completion == " yes"."""
  _check(kind, ("truth", "info"))
  _check(split, ("train", "eval", "all"))
  out = []
  for line, r in enumerate(sources.load_source(f"truthfulqa_judge_{kind}", data_root).to_list(), 1):
    m = _QA.match(r["prompt"])
    if not m:
      raise ValueError(f"finetune_{kind}.jsonl row {line}: prompt does not start with 'Q: ...\\nA:'")
    key = m.group(1).strip()
    if split == "all" or _split_of(key) == split:
      out.append({"prompt": r["prompt"], "completion": r["completion"],
                  "label": r["completion"].strip() == "yes", "key": key, "split": _split_of(key)})
  return out


def alpaca_preferences(split: str, data_root=None) -> List[dict]:
  """Preference rows with text on both sides, minus self-comparisons.

  train: instructions of the helpfulness SFT set; eval: the other instructions.
  preference = 1 + P(output_2 preferred over output_1 = gpt4_1106_preview).
  """
  _check(split)
  outputs: Dict[str, Dict[int, str]] = {}
  for r in sources.load_source("alpaca_eval_outputs", data_root).to_list():
    outputs.setdefault(r["generator"], {})[r["idx"]] = r["output"]
  instr = {r["idx"]: r["instruction"] for r in sources.load_source("alpaca_eval_instructions", data_root).to_list()}
  train_idx = {r["meta"]["idx"] for r in splits.helpfulness("train", data_root)}
  out = []
  for r in sources.load_source("alpaca_eval_preferences", data_root).to_list():
    g1, g2, i = r["generator_1"], r["generator_2"], r["idx"]
    if g2 == g1 or g1 not in outputs or g2 not in outputs or ((i in train_idx) != (split == "train")):
      continue
    out.append({"idx": i, "instruction": instr[i], "generator_1": g1, "generator_2": g2,
                "output_1": outputs[g1][i], "output_2": outputs[g2][i], "preference": r["preference"],
                "key": instr[i], "split": split})
  return out
