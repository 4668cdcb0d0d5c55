"""Per-axis SFT train / held-out eval splits by the data README's hash rule.

    bucket(key) = int(sha256(key.utf8).hexdigest()[:8], 16) % 100
    train: bucket < 50, eval: bucket >= 50

Keys: helpfulness `instruction` (and AlpacaEval idx 0-49 are always eval: the
50 prompts H^3Fusion scores), harmlessness the HH-RLHF `prompt` field,
honesty `question.strip()`. `honesty(rule="paper")` instead reproduces the
paper's file-order split (idx < 408 train).

Every function returns records, plain dicts:
  instruction: str   the user request (Alpaca "### Instruction")
  input: str         Alpaca "### Input" context ("" for every 3H source)
  response: str      SFT target (train) or reference answer (eval)
  task: int          0 helpful, 1 harmless, 2 honest
  source: str        data source name
  key: str           the hash-split key
  meta: dict         source-specific extras (idx, dataset, reference answers,
                     chat `messages` for multi-turn prompts, ...)
"""

from __future__ import annotations

import hashlib
from typing import List, Optional

from h3jax.data import sources

HELPFUL, HARMLESS, HONEST = 0, 1, 2
AXES = ("helpful", "harmless", "honest")  # index = task label
TRAIN_BUCKETS = 50  # bucket < 50 is train
PAPER_HELPFUL_EVAL = 50  # AlpacaEval idx 0..49: always eval (the paper's scored subset)
PAPER_HONEST_TRAIN = 408  # the paper: first 408 TruthfulQA questions in file order
SFT_TEACHER = "gpt4_1106_preview"
_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def bucket(key: str) -> int:
  """0..99, the data README's deterministic hash bucket."""
  return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def is_train_key(key: str) -> bool:
  return bucket(key) < TRAIN_BUCKETS


def _check_split(split):
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _record(instruction, response, task, source, key, **meta):
  return {"instruction": instruction, "input": "", "response": response, "task": task,
          "source": source, "key": key, "meta": meta}


def reference_outputs(generator: str = SFT_TEACHER, data_root=None) -> dict:
  """{AlpacaEval idx: output} of one stored model (e.g. text_davinci_003)."""
  ds = sources.load_source("alpaca_eval_outputs", data_root)
  out = {r["idx"]: r["output"] for r in ds.to_list() if r["generator"] == generator}
  if not out:
    raise ValueError(f"no stored AlpacaEval outputs for generator {generator!r}")
  return out


def helpfulness(split: str, data_root=None, *, subset: str = "full") -> List[dict]:
  """AlpacaEval instructions; train targets are the gpt4_1106_preview outputs.

  train: bucket < 50 and idx >= 50 (372). eval: the rest (433), or with
  subset="paper" only idx 0..49 (50). Eval `response` is the same reference.
  """
  _check_split(split)
  if subset not in ("full", "paper"):
    raise ValueError(f"subset must be 'full' or 'paper', got {subset!r}")
  outputs = reference_outputs(SFT_TEACHER, data_root)
  out = []
  for row in sources.load_source("alpaca_eval_instructions", data_root).to_list():
    idx, inst = row["idx"], row["instruction"]
    train = idx >= PAPER_HELPFUL_EVAL and is_train_key(inst)
    if (split == "train") != train or (subset == "paper" and idx >= PAPER_HELPFUL_EVAL):
      continue
    if idx not in outputs:
      raise ValueError(f"AlpacaEval idx {idx} has no {SFT_TEACHER} output in model_outputs.jsonl")
    out.append(_record(inst, outputs[idx], HELPFUL, "alpaca_eval", inst, idx=idx,
                       dataset=row["dataset"]))
  return out


def hh_messages(prompt: str) -> List[dict]:
  """An HH-RLHF dialogue prefix ("\\n\\nHuman: ..\\n\\nAssistant:") as chat messages."""
  if not (prompt.startswith(_HUMAN) and prompt.endswith(_ASSISTANT)):
    raise ValueError(f"not an HH-RLHF dialogue prefix: {prompt[:60]!r}...{prompt[-30:]!r}")
  body, turns = prompt[:-len(_ASSISTANT)], []
  for chunk in body.split(_HUMAN)[1:]:
    parts = chunk.split(_ASSISTANT)
    turns.append(("user", parts[0].strip()))
    turns += [("assistant", t.strip()) for t in parts[1:]]
  msgs = []  # 4 transcripts have two assistant turns in a row: merge them so roles alternate
  for role, text in turns:
    if msgs and msgs[-1]["role"] == role:
      msgs[-1]["content"] += "\n\n" + text
    else:
      msgs.append({"role": role, "content": text})
  return msgs


def hh_instruction(prompt: str) -> str:
  """Single turn: the human text. Multi-turn: the transcript without the final "Assistant:"."""
  msgs = hh_messages(prompt)
  if len(msgs) == 1:
    return msgs[0]["content"]
  return prompt[:-len(_ASSISTANT)].strip()


def harmlessness(split: str, data_root=None, *, drop_empty: bool = True) -> List[dict]:
  """HH-RLHF harmless-base test: prompt -> chosen_response.

  train: bucket(prompt) < 50 (1,161 rows; 1,160 once the empty chosen_response
  is dropped). eval: bucket >= 50 (1,151 rows, all kept).
  """
  _check_split(split)
  out = []
  for row in sources.load_source("hh_rlhf_harmless", data_root).to_list():
    p = row["prompt"]
    if (split == "train") != is_train_key(p):
      continue
    if split == "train" and drop_empty and not row["chosen_response"].strip():
      continue
    msgs = hh_messages(p)
    out.append(_record(hh_instruction(p), row["chosen_response"], HARMLESS, "hh_rlhf_harmless", p,
                       idx=row["idx"], messages=msgs, rejected_response=row["rejected_response"]))
  return out


def honesty(split: str, data_root=None, *, rule: str = "hash") -> List[dict]:
  """TruthfulQA generation set.

  train: one record per `correct_answers` entry of each train question (hash:
  402 questions -> 1,401 pairs; paper: idx < 408 -> 1,548 pairs). eval: one
  record per question with `best_answer` as response (hash: 415; paper: 409).
  """
  _check_split(split)
  if rule not in ("hash", "paper"):
    raise ValueError(f"rule must be 'hash' or 'paper', got {rule!r}")
  out = []
  for row in sources.load_source("truthfulqa_generation", data_root).to_list():
    q = row["question"].strip()
    train = is_train_key(q) if rule == "hash" else row["idx"] < PAPER_HONEST_TRAIN
    if (split == "train") != train:
      continue
    meta = dict(idx=row["idx"], category=row.get("category"), best_answer=row["best_answer"],
                correct_answers=list(row["correct_answers"]),
                incorrect_answers=list(row["incorrect_answers"]))
    if split == "train":
      out += [_record(q, a, HONEST, "truthfulqa", q, **meta) for a in row["correct_answers"]]
    else:
      out.append(_record(q, row["best_answer"], HONEST, "truthfulqa", q, **meta))
  return out


# Synthetic refusals (data README, "Refusal-style data": no refusal responses ship with the data, so
# they are written from fixed templates and reported as synthetic). One template per instruction, picked
# by its hash bucket, so the set is deterministic.
REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that. It could seriously harm people.",
    "I can't assist with this request. The information could be used to hurt someone or to break the law.",
    "Sorry, I won't help with that. If you have another question, I'm happy to help.",
    "I'm not able to provide that. It would be unsafe and possibly illegal.",
    "I can't help with that request, because it could put people at risk. Is there something else I can do "
    "for you?",
    "I'm sorry, I can't do that. This asks for something harmful, and I won't provide it.",
    "No, I can't help with this. Helping could cause real harm, so I have to decline.",
    "I won't provide instructions or content for this. It could hurt others. Let me know if I can help with "
    "something else.",
)


def refusals(split: str, data_root=None) -> List[dict]:
  """Harmful instructions paired with template refusals (synthetic), label harmless.

  train: refusal_direction/harmful_train (260; 117 are AdvBench goals, which
  `h3jax.evaluation.harm.advbench` drops from evaluation). eval:
  refusal_direction/harmful_val (39 HarmBench val behaviours).
  """
  _check_split(split)
  name = "refusal_direction_harmful_" + ("train" if split == "train" else "val")
  out = []
  for i, row in enumerate(sources.load_source(name, data_root).to_list()):
    inst = row["instruction"]
    out.append(_record(inst, REFUSAL_TEMPLATES[bucket(inst) % len(REFUSAL_TEMPLATES)], HARMLESS,
                       "refusal_direction (synthetic refusal)", inst, idx=i, category=row.get("category")))
  return out


# Record sets that are not an axis; a data spec joins names with "+" ("harmless+refusals").
EXTRA_SETS = {"refusals": refusals}


_AXIS_FNS = {HELPFUL: helpfulness, HARMLESS: harmlessness, HONEST: honesty}


def axis_index(axis) -> int:
  """'helpful' | 'harmless' | 'honest' | 0 | 1 | 2 -> task label."""
  if isinstance(axis, str) and axis in AXES:
    return AXES.index(axis)
  if isinstance(axis, int) and 0 <= axis < len(AXES):
    return axis
  raise ValueError(f"unknown axis {axis!r}; expected one of {AXES} or 0/1/2")


def axis_split(axis, split: str, data_root=None, **kw) -> List[dict]:
  """Dispatch to helpfulness / harmlessness / honesty (kw passed through)."""
  return _AXIS_FNS[axis_index(axis)](split, data_root, **kw)


def split_keys(records: List[dict]) -> set:
  return {r["key"] for r in records}


def unique_count(records: List[dict], field: Optional[str] = "key") -> int:
  return len({r[field] for r in records})
