"""Text features for the judges: hashed n-grams per field plus a few dense shape features.

A judge input is a dict of named text fields (e.g. {"q": question, "a": answer}).
Each field is lower-cased, split into words and punctuation, and its 1..n-grams
are hashed (crc32, stable across machines and Python runs, unlike `hash`) into
`dim` buckets in a per-field namespace, so "sorry" in the prompt and in the
response are different features. The first `lead` tokens of each field get a
second namespace: refusals and hedges are decided by how a reply starts.
Values are sublinear term frequencies (1 + log count), L2-normalised per field.

Dense features (log length, lines, list items, markdown, ...) are computed
from the *last* field (the response) and standardised with training-set
statistics stored in the judge card.

A featurised batch is a flat sparse matrix (ids [nnz], vals [nnz], rows [nnz])
plus dense [N, F]: nnz varies a lot between a 3-word answer and a 600-word
essay, so padding to the longest row would waste most of the memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Dict, List, Sequence

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")
DENSE_NAMES = ("log_chars", "log_words", "log_lines", "list_items", "md_marks", "questions", "empty")


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  fields: tuple  # field names, in order; dense features come from the last one
  dim: int = 1 << 18  # hash buckets
  ngrams: int = 2
  lead: int = 6  # first tokens of a field also hashed in a position namespace
  max_chars: int = 6000  # per field: bounds the cost of very long responses

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "FeatureConfig":
    return cls(**dict(d, fields=tuple(d["fields"])))


@dataclasses.dataclass
class Sparse:
  """N rows of hashed features: ids/vals/rows [nnz] and dense [N, F]."""
  ids: np.ndarray
  vals: np.ndarray
  rows: np.ndarray
  dense: np.ndarray

  @property
  def n(self) -> int:
    return self.dense.shape[0]

  def take(self, index) -> "Sparse":
    """Rows `index` (in that order) as a new Sparse."""
    index = np.asarray(index, np.int64)
    starts = np.searchsorted(self.rows, np.arange(self.n), side="left")
    ends = np.searchsorted(self.rows, np.arange(self.n), side="right")
    parts = [np.arange(starts[i], ends[i]) for i in index]
    sel = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    new_rows = np.repeat(np.arange(len(index)), [len(p) for p in parts])
    return Sparse(self.ids[sel], self.vals[sel], new_rows.astype(np.int32), self.dense[index])


def tokens(text: str) -> List[str]:
  return _TOKEN.findall(text.lower())


class _Hasher:
  """crc32 of 'namespace|gram' mod dim, memoised (the same n-grams recur a lot)."""

  def __init__(self, dim: int):
    self.dim, self.memo = dim, {}

  def __call__(self, s: str) -> int:
    h = self.memo.get(s)
    if h is None:
      h = self.memo[s] = zlib.crc32(s.encode("utf-8")) % self.dim
    return h


def _field_features(text: str, name: str, cfg: FeatureConfig, hasher: _Hasher) -> Dict[int, float]:
  toks = tokens(text[:cfg.max_chars])
  counts: Dict[int, float] = {}
  for n in range(1, cfg.ngrams + 1):
    for i in range(len(toks) - n + 1):
      h = hasher(f"{name}|{' '.join(toks[i:i + n])}")
      counts[h] = counts.get(h, 0.0) + 1.0
  for i, t in enumerate(toks[:cfg.lead]):
    h = hasher(f"{name}@{i}|{t}")
    counts[h] = counts.get(h, 0.0) + 1.0
  if not toks:
    counts[hasher(f"{name}|<empty>")] = 1.0
  vals = {h: 1.0 + math.log(c) for h, c in counts.items()}
  norm = math.sqrt(sum(v * v for v in vals.values()))
  return {h: v / norm for h, v in vals.items()}


def dense_features(text: str) -> List[float]:
  """Shape of a response, in DENSE_NAMES order (unstandardised)."""
  words = len(text.split())
  lines = text.count("\n") + 1
  items = len(re.findall(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s", text))
  md = len(re.findall(r"\*\*|^#+\s|```", text, flags=re.M))
  return [math.log1p(len(text)), math.log1p(words), math.log1p(lines), math.log1p(items), math.log1p(md),
          math.log1p(text.count("?")), float(not text.strip())]


def featurize(rows: Sequence[Sequence[str]], cfg: FeatureConfig) -> Sparse:
  """rows: one tuple of field texts per example, in cfg.fields order."""
  hasher = _Hasher(cfg.dim)
  ids, vals, rix, dense = [], [], [], []
  for r, fields in enumerate(rows):
    if len(fields) != len(cfg.fields):
      raise ValueError(f"row {r} has {len(fields)} fields, expected {len(cfg.fields)} {cfg.fields}")
    merged: Dict[int, float] = {}
    for name, text in zip(cfg.fields, fields):
      if not isinstance(text, str):
        raise TypeError(f"row {r} field {name!r} must be a str, got {type(text).__name__}")
      for h, v in _field_features(text, name, cfg, hasher).items():
        merged[h] = merged.get(h, 0.0) + v
    ids.extend(merged)
    vals.extend(merged.values())
    rix.extend([r] * len(merged))
    dense.append(dense_features(fields[-1]))
  return Sparse(np.asarray(ids, np.int32), np.asarray(vals, np.float32), np.asarray(rix, np.int32),
                np.asarray(dense, np.float32).reshape(len(rows), len(DENSE_NAMES)))
