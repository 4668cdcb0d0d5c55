"""Minimal instruction-SFT data: records -> token arrays -> deterministic batches.

A record is a dict with `instruction`, `response`, `task` (0 helpful, 1
harmless, 2 honest) and optionally `input`; the same schema as
`h3jax.data.splits`. The reader is deliberately small and replaceable: the
loop only needs `SFTBatches.batch(step)` and `SFTBatches.state()`.

Batches are a pure function of (seed, step): example order is a fresh
permutation per epoch drawn from `np.random.default_rng([seed, epoch])`, so a
resumed run sees exactly the batches an uninterrupted run would.

A batch is {input_ids_BT int32, loss_mask_BT int32 (1 on response target
tokens), attention_mask_BT int32, task_B int32}.
"""

from __future__ import annotations

import json
import pathlib
from typing import List, Optional, Sequence

import numpy as np

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n")
TEMPLATES = ("alpaca", "chat", "plain")


class ByteTokenizer:
  """Bytes as ids 3..258 plus pad 0 / bos 1 / eos 2: a tokenizer for tiny CPU models."""
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 259

  def encode(self, text: str) -> List[int]:
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
  """transformers tokenizer from a local folder behind the same small interface."""

  def __init__(self, path):
    from transformers import AutoTokenizer  # lazy: tiny runs never import transformers
    self.tok = AutoTokenizer.from_pretrained(str(path))
    self.bos_id = self.tok.bos_token_id
    self.eos_id = self.tok.eos_token_id
    self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos_id or 0)
    self.vocab_size = len(self.tok)

  def encode(self, text: str) -> List[int]:
    return list(self.tok.encode(text, add_special_tokens=False))

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def chat_prompt(self, instruction: str) -> str:
    return self.tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                       add_generation_prompt=True)


def make_tokenizer(spec: str):
  """'bytes' or a local HF folder."""
  if spec == "bytes":
    return ByteTokenizer()
  if not pathlib.Path(spec).is_dir():
    raise ValueError(f"tokenizer must be 'bytes' or an HF model folder; {spec!r} is neither")
  return HFTokenizer(spec)


def read_jsonl(path) -> List[dict]:
  """Records from a JSONL file; names the file and line of a bad row."""
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from None
      for field in ("instruction", "response"):
        if not isinstance(row.get(field), str):
          raise ValueError(f"{path}:{i}: field {field!r} missing or not a string")
      out.append(row)
  return out


def load_records(source: str, task: Optional[int] = None, data_root=None, split: str = "train",
                 max_examples: int = 0) -> List[dict]:
  """A JSONL path or a 3H axis name ('helpful' | 'harmless' | 'honest', via h3jax.data)."""
  if source.endswith(".jsonl"):
    recs = read_jsonl(source)
  else:
    from h3jax.data import splits
    recs = splits.axis_split(source, split, data_root)
  if task is not None:
    recs = [dict(r, task=int(task)) for r in recs]
  if max_examples:
    recs = recs[:max_examples]
  if not recs:
    raise ValueError(f"data source {source!r} gave no examples")
  return recs


def mixed_task_labels(sizes: Sequence[int], mode: str = "per_source") -> List[int]:
  """Labels of concatenated sources: `per_source` (correct) or the reference code's `cumulative` bug.

  cumulative (defect #5): [0]*n0 + [1]*(n0+n1) + [2]*(n0+n1+n2) ..., truncated to sum(sizes).
  """
  if mode == "per_source":
    return [i for i, n in enumerate(sizes) for _ in range(n)]
  if mode == "cumulative":
    out = []
    for i in range(len(sizes)):
      out += [i] * sum(sizes[:i + 1])
    return out[:sum(sizes)]
  raise ValueError(f"unknown task_labels mode {mode!r}; expected per_source | cumulative")


def format_example(rec: dict, tokenizer, template: str, end_marker: str = "", add_eos: bool = True):
  """(prompt_ids, target_ids) for one record."""
  instr = rec["instruction"]
  if template == "alpaca":
    if rec.get("input"):
      prompt = (ALPACA_PREAMBLE_INPUT + f"### Instruction:\n{instr}\n\n### Input:\n{rec['input']}"
                "\n\n### Response:")
    else:
      prompt = ALPACA_PREAMBLE + f"### Instruction:\n{instr}\n\n### Response:"
  elif template == "chat":
    prompt = tokenizer.chat_prompt(instr)
  elif template == "plain":
    prompt = instr + "\n"
  else:
    raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
  bos = [tokenizer.bos_id] if (template != "chat" and tokenizer.bos_id is not None) else []
  target = tokenizer.encode(rec["response"] + end_marker)
  if add_eos and tokenizer.eos_id is not None:
    target = target + [tokenizer.eos_id]
  return bos + tokenizer.encode(prompt), target


def tokenize(records: Sequence[dict], tokenizer, seq_len: int, template: str, *, end_marker: str = "",
             add_eos: bool = True) -> dict:
  """Right-padded arrays [N, T]; long prompts keep their last T/2 tokens, then the target is cut."""
  N = len(records)
  ids_NT = np.full((N, seq_len), tokenizer.pad_id, np.int32)
  loss_NT = np.zeros((N, seq_len), np.int32)
  attn_NT = np.zeros((N, seq_len), np.int32)
  for n, rec in enumerate(records):
    prompt, target = format_example(rec, tokenizer, template, end_marker, add_eos)
    if len(prompt) + len(target) > seq_len:
      prompt = prompt[-max(seq_len - len(target), seq_len // 2):]
    seq = (prompt + target)[:seq_len]
    ids_NT[n, :len(seq)] = seq
    attn_NT[n, :len(seq)] = 1
    loss_NT[n, len(prompt):len(seq)] = 1
  task_N = np.asarray([int(r.get("task", 0)) for r in records], np.int32)
  return {"input_ids_BT": ids_NT, "loss_mask_BT": loss_NT, "attention_mask_BT": attn_NT, "task_B": task_N}


class SFTBatches:
  """Deterministic batches over tokenized arrays: batch(step) depends only on (seed, step)."""

  def __init__(self, arrays: dict, batch_size: int, seed: int):
    self.arrays = arrays
    self.n = len(arrays["task_B"])
    if self.n == 0:
      raise ValueError("empty dataset")
    self.batch_size, self.seed = batch_size, seed
    self._perms = {}

  def _perm(self, epoch: int):
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
    return self._perms[epoch]

  def batch(self, step: int) -> dict:
    flat = step * self.batch_size + np.arange(self.batch_size)
    idx = np.asarray([self._perm(int(i) // self.n)[int(i) % self.n] for i in flat])
    return {k: v[idx] for k, v in self.arrays.items()}

  def state(self, step: int) -> dict:
    return {"seed": self.seed, "next_step": int(step), "num_examples": self.n}
