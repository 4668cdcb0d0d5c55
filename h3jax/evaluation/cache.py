"""Per-model JSONL cache of generations and log-prob scores, so re-runs skip finished work.

One file per model; one JSON object per line:
  {"key": sha256 hex, "kind": "generation" | "mc" | "judge", "value": ..., "meta": {...}}
plus "time" rows {"kind": "time", "value": {"stage", "s", "cpu", "n"}} written
with each batch: its wall and CPU seconds and item count, so `times()` sums a
run's cost over every session that contributed to the cache.
The key hashes the exact model input (formatted prompt, or context and
choices) together with every setting that changes the output (decoding
settings, max_new_tokens, seed, dtype, format) and, for generations and MC
log-probs, the model's fingerprint (`models.fingerprint`), so a changed
setting or another model with the same name misses the cache instead of
reusing stale text. Rows written before the fingerprint was keyed (no
"model" in their meta) are counted in `legacy` and never match.

Writes append whole lines (one write under an exclusive flock, so several
processes may share the file: `evaluate --shard`) and fsync after each batch:
a run killed mid-batch loses at most that batch. An append starts on a fresh
line when the file does not end with one (a worker killed mid-write left a
torn row), and a torn or malformed row is skipped on load with a warning that
names the file and line: its item is simply redone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import sys
import uuid
from typing import Dict, Iterable, List, Optional, Tuple


def item_key(kind: str, payload, settings: dict) -> str:
  blob = json.dumps({"kind": kind, "payload": payload, "settings": settings}, sort_keys=True,
                    ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def time_row(stage: str, seconds: float, n: int, cpu_seconds: float = 0.0) -> Tuple[str, str, dict, dict]:
  """A put_many entry: `n` items of `stage` took `seconds` of wall time and `cpu_seconds` of this
  process's CPU time (all threads; unlike wall time, not inflated by other jobs or a paused process)."""
  return (f"time-{uuid.uuid4().hex}", "time",
          {"stage": stage, "s": round(float(seconds), 3), "cpu": round(float(cpu_seconds), 3), "n": int(n)}, {})


class Cache:
  """Append-only key -> value store backed by one JSONL file."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self._data: Dict[str, object] = {}
    self._cut: Dict[str, bool] = {}  # generation rows: cut by max_new_tokens (rows written since the flag)
    self._times: List[dict] = []
    self.legacy = 0  # generation/MC rows keyed by model name (before fingerprints): never matched
    if self.path.exists():
      self._load()

  def _load(self):
    with open(self.path, "r+b") as f:
      fcntl.flock(f, fcntl.LOCK_EX)  # another process (evaluate --shard) may be appending
      raw = f.read()
      if self._parse(raw):  # drop a torn tail so later appends start on a fresh line
        f.truncate(raw.rfind(b"\n") + 1 if b"\n" in raw else 0)

  def _parse(self, raw: bytes) -> bool:
    """Reads the rows of raw; returns whether its last line is torn (no newline)."""
    lines = raw.split(b"\n")
    torn = bool(lines) and lines[-1] != b""  # the last line lacks its newline
    bad = []
    for lineno, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line.decode("utf-8"))
        key, value, kind = row["key"], row["value"], row.get("kind")
      except (ValueError, KeyError, TypeError) as e:
        if not (torn and lineno == len(lines)):  # a torn tail is the common, silent case
          bad.append(f"{lineno} ({e})")
        continue  # a write interrupted by a kill: that item is simply redone
      if kind == "time":
        self._times.append(value)
      else:
        self._data[key] = value
        meta = row.get("meta") or {}
        if kind == "generation" and "cut" in meta:
          self._cut[key] = bool(meta["cut"])
        if kind in ("generation", "mc") and "model" not in meta:
          self.legacy += 1
    if bad:
      print(f"warning: {self.path}: skipped {len(bad)} torn or malformed row(s) at line "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; their items are redone",
            file=sys.stderr, flush=True)
    return torn

  def __contains__(self, key: str) -> bool:
    return key in self._data

  def __len__(self) -> int:
    return len(self._data)

  def cut(self, key: str) -> Optional[bool]:
    """Whether the cached generation `key` was cut by max_new_tokens (None: not recorded)."""
    return self._cut.get(key)

  def get(self, key: str, default=None):
    return self._data.get(key, default)

  def put_many(self, entries: Iterable[Tuple[str, str, object, dict]]):
    """Append (key, kind, value, meta) rows durably."""
    entries = list(entries)
    rows = [json.dumps({"key": k, "kind": kind, "value": v, "meta": meta}, ensure_ascii=False)
            for k, kind, v, meta in entries]
    if not rows:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    data = memoryview(("\n".join(rows) + "\n").encode("utf-8"))
    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)  # whole rows even when several processes append
      size = os.fstat(fd).st_size
      if size and os.pread(fd, 1, size - 1) != b"\n":  # a killed writer's torn row: start afresh
        data = memoryview(b"\n" + bytes(data))
      while data:
        data = data[os.write(fd, data):]
      os.fsync(fd)
    finally:
      os.close(fd)  # releases the lock
    for k, kind, v, meta in entries:
      if kind == "time":
        self._times.append(v)
      else:
        self._data[k] = v
        if kind == "generation" and "cut" in (meta or {}):
          self._cut[k] = bool(meta["cut"])

  def times(self) -> Dict[str, dict]:
    """{stage: {"s": wall seconds, "cpu": CPU seconds, "n": items}} summed over every session."""
    out: Dict[str, dict] = {}
    for t in self._times:
      acc = out.setdefault(t["stage"], {"s": 0.0, "cpu": 0.0, "n": 0})
      acc["s"] = round(acc["s"] + t["s"], 3)
      acc["cpu"] = round(acc["cpu"] + t.get("cpu", 0.0), 3)
      acc["n"] += t["n"]
    return out

  def put(self, key: str, kind: str, value, meta=None):
    self.put_many([(key, kind, value, meta or {})])
