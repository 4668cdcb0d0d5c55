"""The 3H SFT mixture and a deterministic, resumable batch iterator.

Interface for the trainer (kept stable):

  records = load_records(spec, split="train", data_root=None, task=None)
      spec: an axis ("helpful" | "harmless" | "honest"), "mixture", a record
      set of `splits.EXTRA_SETS` ("refusals": synthetic template refusals),
      names joined with "+" ("harmless+refusals"), or a JSONL file of {"instruction", "response", ["input"], ["task"]}
      rows (errors name file:line); task overrides every record's label.
  records = mixture_records(data_root, axes=AXES, weights=None, seed=0,
                            honesty_rule="hash", task_labels="per_source")
      Union of the per-axis train splits with task labels 0 helpful, 1
      harmless, 2 honest (372 + 1,160 + 1,401 = 2,933 records by default).
      weights={"helpful": w0, ...}: axis a gets round(w_a / sum(w) * N)
      records (N = the natural total), whole copies first, then a seeded draw
      without replacement; an axis missing from weights is left out.
      task_labels="cumulative" reproduces the reference code's label bug
      (defect #5 in docs/h3fusion.md): labels [0]*n0 + [1]*(n0+n1) + ...
      cut to the total, so late examples carry the wrong axis.
  it = make_iterator(records, tokenizer, batch_size=8, max_len=300, seed=42,
                     template="alpaca", pack=False, start_step=0,
                     end_marker=None, add_eos=False, min_prompt_frac=0.5, system=None)
      template: "alpaca" (the paper's; target + "###END", no EOS), "chat" (the
      tokenizer's chat template) or "plain"; see h3jax.data.format / tokenize.
      it.steps_per_epoch(), it.epoch_rows(e) describe an epoch.
  batch = next(it)   # or it.batch(step): a pure function of (data, config, step)
  it.state() -> {"step", "seed", "fingerprint"}   (JSON-able; step = next batch)
  it.restore(state)  # the next batch is batch(state["step"]); raises if the data
                     # or config differ from those the state was saved with

A batch is a dict of int32 numpy arrays, T = max_len always (static shapes):
  input_ids_BT       token ids, pad id after the content
  loss_mask_BT       1 on target tokens (the trainer weighs next-token loss at t
                     by loss_mask[t]); 0 on prompts and padding
  attention_mask_BT  1 on real tokens
  positions_BT       0.. per row, or per packed segment
  segment_ids_BT     1..k for the k examples of a row, 0 on padding; pass it to
                     `h3jax.forward(segment_ids_BT=...)` so packed examples do not
                     attend to each other
  task_B             the row's task label (packing only joins examples of one
                     task, so a row has exactly one)

Order: epoch e visits the examples in `np.random.default_rng([seed, e])
.permutation(n)`; batches run on across epoch ends. With pack=True each epoch's
order is packed greedily (one open row per task; a row is emitted when the
next example of its task does not fit). Epoch e starts at global row
sum(rows(0..e-1)), so resuming at any step reproduces an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Optional, Sequence

import numpy as np

from h3jax.data import format as fmt
from h3jax.data import sources
from h3jax.data import splits
from h3jax.data import tokenize as tok_lib

AXES = splits.AXES
BATCH_KEYS = ("input_ids_BT", "loss_mask_BT", "attention_mask_BT", "positions_BT", "segment_ids_BT",
              "task_B")


def mixture_records(data_root=None, *, axes: Sequence[str] = AXES, weights: Optional[Dict[str, float]] = None,
                    seed: int = 0, honesty_rule: str = "hash", task_labels: str = "per_source") -> List[dict]:
  """The Stage-B / data-mixture SFT set (see the module docstring for weights, task_labels)."""
  if task_labels not in ("per_source", "cumulative"):
    raise ValueError(f"task_labels must be 'per_source' or 'cumulative' (defect #5), got {task_labels!r}")
  if weights is not None:
    num = all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights.values())
    if any(a not in AXES for a in weights) or not num or not sum(weights.values()) > 0:
      raise ValueError(f"mixture weights must map axes {AXES} to non-negative numbers with a positive "
                       f"sum, got {weights!r}")
    axes = [a for a in AXES if weights.get(a, 0) > 0]
  per_axis = {}
  for a in axes:
    kw = {"rule": honesty_rule} if splits.axis_index(a) == splits.HONEST else {}
    per_axis[a] = splits.axis_split(a, "train", data_root, **kw)
  if weights is not None:
    total_w, n_total = sum(weights[a] for a in axes), sum(len(v) for v in per_axis.values())
    for a in axes:
      recs, want = per_axis[a], int(round(weights[a] / total_w * n_total))
      reps, rest = divmod(want, len(recs))
      rng = np.random.default_rng([seed, splits.axis_index(a)])
      per_axis[a] = recs * reps + [recs[i] for i in sorted(rng.choice(len(recs), rest, replace=False))]
  out = [r for a in axes for r in per_axis[a]]
  if task_labels == "cumulative":
    labels = cumulative_task_labels([len(per_axis[a]) for a in axes])
    out = [dict(r, task=t) for r, t in zip(out, labels)]
  return out


def cumulative_task_labels(sizes: Sequence[int]) -> List[int]:
  """The reference's labels: [i] * sum(sizes[:i + 1]) for each source i, cut to sum(sizes)."""
  out = []
  for i in range(len(sizes)):
    out += [i] * sum(sizes[:i + 1])
  return out[:sum(sizes)]


def check_spec(spec: str) -> None:
  """Raise on a data spec `load_records` cannot read, without loading any data."""
  if str(spec).endswith(".jsonl") or spec == "mixture":
    return
  for part in str(spec).split("+"):
    if part not in splits.EXTRA_SETS and part not in AXES and not part.isdigit():
      raise ValueError(f"unknown data spec {part!r} in {spec!r}: expected an axis {AXES}, 'mixture', "
                       f"one of {sorted(splits.EXTRA_SETS)}, names joined with '+', or a .jsonl file")


def load_records(spec: str, *, split: str = "train", data_root=None, task: Optional[int] = None) -> List[dict]:
  """Records of an axis, of the mixture, or of a user JSONL file (see the module docstring)."""
  if str(spec).endswith(".jsonl"):
    rows, lines = sources.scan_jsonl(spec, ("instruction", "response"))
    recs = []
    for row, line in zip(rows, lines):
      if not isinstance(row["instruction"], str) or not isinstance(row["response"], str):
        raise ValueError(f"{spec}:{line}: 'instruction' and 'response' must be strings")
      rec = {"instruction": row["instruction"], "input": row.get("input") or "", "response": row["response"],
             "task": row.get("task", 0 if task is None else task), "source": str(spec), "key": row["instruction"],
             "meta": {"line": line}}
      try:
        tok_lib.task_label(rec)
      except ValueError:
        raise ValueError(f"{spec}:{line}: task must be 0, 1 or 2, got {rec['task']!r}") from None
      recs.append(rec)
  elif spec == "mixture":
    if split != "train":
      raise ValueError("the mixture is a training set; evaluate per axis (split='eval')")
    recs = mixture_records(data_root)
  else:
    check_spec(spec)
    recs = []
    for part in str(spec).split("+"):
      if part in splits.EXTRA_SETS:
        recs += splits.EXTRA_SETS[part](split, data_root)
      else:
        recs += splits.axis_split(int(part) if part.isdigit() else part, split, data_root)
  if task is not None:
    recs = [dict(r, task=int(task)) for r in recs]
    tok_lib.task_label(recs[0])
  return recs


def pack_order(order: Sequence[int], lengths: Sequence[int], tasks: Sequence[int], max_len: int):
  """Greedy same-task packing of examples in `order`: a list of rows (lists of example ids)."""
  rows, open_rows = [], {}
  for i in order:
    t, n = tasks[i], lengths[i]
    row = open_rows.get(t)
    if row is not None and row[1] + n > max_len:
      rows.append(row[0])
      row = None
    if row is None:
      row = open_rows[t] = [[], 0]
    row[0].append(int(i))
    row[1] += n
  rows += [open_rows[t][0] for t in sorted(open_rows)]
  return rows


class BatchIterator:
  """Batches over tokenized examples; batch(step) depends only on data, config and step."""

  def __init__(self, examples: Sequence[dict], *, batch_size: int, max_len: int, seed: int,
               pack: bool = False, pad_id: int = 0, start_step: int = 0):
    if not examples:
      raise ValueError("no examples to iterate over")
    if batch_size < 1 or max_len < 2:
      raise ValueError(f"batch_size must be >= 1 and max_len >= 2, got {batch_size}, {max_len}")
    too_long = [i for i, e in enumerate(examples) if len(e["input_ids_T"]) > max_len]
    if too_long:
      raise ValueError(f"{len(too_long)} examples exceed max_len={max_len} (first: #{too_long[0]}); "
                       "tokenize with the same max_len")
    self.examples, self.batch_size, self.max_len = list(examples), int(batch_size), int(max_len)
    self.seed, self.pack, self.pad_id = int(seed), bool(pack), int(pad_id)
    self._lengths = [len(e["input_ids_T"]) for e in self.examples]
    self._tasks = [int(e["task"]) for e in self.examples]
    self._rows: Dict[int, list] = {}  # epoch -> rows (a few recent epochs)
    self._epoch_rows: List[int] = []  # rows per epoch, epochs 0.. computed so far
    self.fingerprint = self._fingerprint()
    self.step = int(start_step)

  def _fingerprint(self) -> str:
    h = hashlib.sha256(json.dumps([self.batch_size, self.max_len, self.seed, self.pack, self.pad_id]).encode())
    for e in self.examples:
      h.update(np.asarray(e["input_ids_T"], np.int32).tobytes())
      h.update(np.asarray(e["loss_mask_T"], np.int32).tobytes())
      h.update(bytes([e["task"]]))
    return h.hexdigest()[:16]

  def epoch_rows(self, epoch: int) -> list:
    """Epoch `epoch`'s rows, each a list of example ids (one id unless packing)."""
    if epoch not in self._rows:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      rows = (pack_order(order, self._lengths, self._tasks, self.max_len) if self.pack
              else [[int(i)] for i in order])
      if len(self._rows) >= 3:
        self._rows.pop(min(self._rows))
      self._rows[epoch] = rows
    return self._rows[epoch]

  def _locate(self, row: int):
    """(epoch, row within epoch) of a global row index."""
    epoch, start = 0, 0
    while True:
      if epoch == len(self._epoch_rows):
        self._epoch_rows.append(len(self.epoch_rows(epoch)))
      if row < start + self._epoch_rows[epoch]:
        return epoch, row - start
      start += self._epoch_rows[epoch]
      epoch += 1

  def steps_per_epoch(self) -> float:
    """Batches per pass over the data (epoch 0's row count / batch_size; exact without packing)."""
    return len(self.epoch_rows(0)) / self.batch_size

  def batch(self, step: int) -> dict:
    B, T = self.batch_size, self.max_len
    out = {k: np.zeros((B, T), np.int32) for k in BATCH_KEYS[:-1]}
    out["input_ids_BT"][:] = self.pad_id
    out["positions_BT"][:] = np.arange(T, dtype=np.int32)  # padding keeps running positions
    out["task_B"] = np.zeros((B,), np.int32)
    for b in range(B):
      epoch, r = self._locate(step * B + b)
      t = 0
      for seg, i in enumerate(self.epoch_rows(epoch)[r], 1):
        ex, n = self.examples[i], self._lengths[i]
        out["input_ids_BT"][b, t:t + n] = ex["input_ids_T"]
        out["loss_mask_BT"][b, t:t + n] = ex["loss_mask_T"]
        out["attention_mask_BT"][b, t:t + n] = 1
        out["positions_BT"][b, t:t + n] = np.arange(n)
        out["segment_ids_BT"][b, t:t + n] = seg
        out["task_B"][b] = self._tasks[i]
        t += n
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = self.batch(self.step)
    self.step += 1
    return b

  def state(self) -> dict:
    return {"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint}

  def restore(self, state: dict):
    if not isinstance(state, dict) or not {"step", "seed", "fingerprint"} <= set(state):
      raise ValueError(f"not a data iterator state: {state!r}")
    if state["fingerprint"] != self.fingerprint or state["seed"] != self.seed:
      raise ValueError(f"data iterator state was saved for other data or settings (fingerprint "
                       f"{state['fingerprint']}, seed {state['seed']}; now {self.fingerprint}, seed "
                       f"{self.seed}): same records, tokenizer, template, max_len, batch_size, pack needed")
    self.step = int(state["step"])
    return self


def make_iterator(records: Sequence[dict], tokenizer, *, batch_size: int, max_len: int, seed: int,
                  template: str = "alpaca", pack: bool = False, start_step: int = 0,
                  **tokenize_kw) -> BatchIterator:
  """Tokenize records (tokenize_kw: end_marker, add_eos, min_prompt_frac, system) and batch them."""
  fmt.check_template(template)
  examples = tok_lib.tokenize_records(records, tokenizer, template, max_len, **tokenize_kw)
  return BatchIterator(examples, batch_size=batch_size, max_len=max_len, seed=seed, pack=pack,
                       pad_id=tok_lib.pad_id(tokenizer), start_step=start_step)
