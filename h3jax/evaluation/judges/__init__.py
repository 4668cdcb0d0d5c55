"""Offline 3H judges: the `Judge` interface, local trained judges and an optional HTTP judge.

  RefusalJudge.score(prompts, responses)       -> P(refusal) [N]    (full or partial)
  TruthJudge.score(questions, answers)         -> P(truthful) [N]
  InfoJudge.score(questions, answers)          -> P(informative) [N]
  PairwiseJudge.prefer(instructions, a, b)     -> P(a better than b) [N]
  load_judges(cfg_or_dir)                      -> Judges(refusal, truth, info, pairwise)

Local judges are small heads on hashed n-gram features (`features`, `heads`),
trained by `python -m h3jax.evaluation.judges.train` from the labelled data in
the data root (XSTest labelled completions, TruthfulQA GPT-judge data,
AlpacaEval GPT-4-turbo preferences). Each is a `<name>.npz` (weights) plus a
`<name>.json` card (data hashes, features, hyperparameters, held-out
agreement next to its baselines). `HttpJudge` asks an OpenAI-compatible chat
endpoint instead; it is never required.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Optional, Sequence

import numpy as np

from h3jax.evaluation.judges import features as features_lib
from h3jax.evaluation.judges import heads
from h3jax.evaluation.judges.http import HttpJudge

JUDGE_NAMES = ("refusal", "truth", "info", "pairwise")
DEFAULT_DIR_ENV = "H3JAX_JUDGES_DIR"
DEFAULT_DIR = "artifacts/judges"


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _check_lengths(**seqs):
  n = {k: len(v) for k, v in seqs.items()}
  if len(set(n.values())) > 1:
    raise ValueError(f"judge inputs must have equal lengths, got {n}")


class LocalJudge:
  """A trained head over hashed n-gram features of a tuple of text fields."""
  task = ""

  def __init__(self, params: dict, card: dict):
    if card.get("task") != self.task:
      raise ValueError(f"judge card is for task {card.get('task')!r}, not {self.task!r}")
    self.params, self.card = params, card
    self.feature_config = features_lib.FeatureConfig.from_json(card["features"])

  def logits(self, *fields: Sequence[str]) -> np.ndarray:
    _check_lengths(**{f: v for f, v in zip(self.feature_config.fields, fields)})
    x = features_lib.featurize(list(zip(*fields)), self.feature_config)
    return heads.scores(self.params, x).astype(np.float64)

  @property
  def metrics(self) -> dict:
    return self.card.get("metrics", {})

  def save(self, directory) -> None:
    """Writes <task>.npz and <task>.json into directory (temp files + rename)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{self.task}.npz.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in self.params.items()})
    os.replace(tmp, d / f"{self.task}.npz")
    tmp = d / f".{self.task}.json.tmp"
    tmp.write_text(json.dumps(self.card, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, d / f"{self.task}.json")


class RefusalJudge(LocalJudge):
  task = "refusal"

  def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """P(the response refuses, fully or partly) [N]."""
    return _sigmoid(self.logits(prompts, responses))


class TruthJudge(LocalJudge):
  task = "truth"

  def score(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """P(the answer is true) [N] (a TruthfulQA judge: trained on TruthfulQA questions only)."""
    return _sigmoid(self.logits(questions, answers))


class InfoJudge(TruthJudge):
  task = "info"


class PairwiseJudge(LocalJudge):
  task = "pairwise"

  def prefer(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """P(response a is better than response b for the instruction) [N]."""
    _check_lengths(instructions=instructions, a=a, b=b)
    s = self.logits(list(instructions) + list(instructions), list(a) + list(b))
    n = len(a)
    return _sigmoid(s[:n] - s[n:])


JUDGE_CLASSES = {c.task: c for c in (RefusalJudge, TruthJudge, InfoJudge, PairwiseJudge)}


def load_judge(directory, task: str) -> LocalJudge:
  """One local judge from <directory>/<task>.{npz,json}."""
  if task not in JUDGE_CLASSES:
    raise ValueError(f"unknown judge {task!r}; expected one of {JUDGE_NAMES}")
  d = pathlib.Path(directory)
  card_path, npz_path = d / f"{task}.json", d / f"{task}.npz"
  for p in (card_path, npz_path):
    if not p.is_file():
      raise FileNotFoundError(f"judge file not found: {p}; build the judges with "
                              f"`python -m h3jax.evaluation.judges.train --out {d}`")
  card = json.loads(card_path.read_text(encoding="utf-8"))
  with np.load(npz_path) as z:
    params = {k: z[k] for k in z.files}
  return JUDGE_CLASSES[task](params, card)


@dataclasses.dataclass
class Judges:
  refusal: Optional[object] = None
  truth: Optional[object] = None
  info: Optional[object] = None
  pairwise: Optional[object] = None

  def get(self, name, default=None):
    return getattr(self, name, default) if name in JUDGE_NAMES else default

  def __getitem__(self, name):
    if name not in JUDGE_NAMES:
      raise KeyError(name)
    return getattr(self, name)


def default_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(DEFAULT_DIR_ENV) or DEFAULT_DIR)


def _get(cfg, key, default=None):
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return getattr(cfg, key, default) if hasattr(cfg, key) else default


def load_judges(cfg_or_dir=None) -> Optional[Judges]:
  """Judges from a directory, or from a config (dict / ConfigDict) with fields:

    kind: "local" (default) | "http" | "none"
    dir: judges directory (local; default $H3JAX_JUDGES_DIR or artifacts/judges)
    build_if_missing: rebuild missing local judges from the data root (default True)
    data_root: for that rebuild (default $H3JAX_DATA_ROOT)
    url, model, api_key_env, timeout: the HTTP judge (kind "http")
  """
  if cfg_or_dir is None or isinstance(cfg_or_dir, (str, os.PathLike)):
    cfg = {"dir": cfg_or_dir}
  else:
    cfg = cfg_or_dir
  kind = _get(cfg, "kind", "local") or "local"
  if kind == "none":
    return None
  if kind == "http":
    url, model = _get(cfg, "url"), _get(cfg, "model")
    if not url or not model:
      raise ValueError("judges.kind='http' needs judges.url and judges.model")
    kw = dict(api_key_env=_get(cfg, "api_key_env", "OPENAI_API_KEY"), timeout=float(_get(cfg, "timeout", 60.0)))
    return Judges(**{t: HttpJudge(url, model, task=t, **kw) for t in JUDGE_NAMES})
  if kind != "local":
    raise ValueError(f"unknown judges.kind {kind!r}; expected 'local', 'http' or 'none'")
  d = pathlib.Path(_get(cfg, "dir") or default_dir())
  missing = [t for t in JUDGE_NAMES if not ((d / f"{t}.json").is_file() and (d / f"{t}.npz").is_file())]
  if missing and _get(cfg, "build_if_missing", True):
    from h3jax.evaluation.judges import train  # pylint: disable=g-import-not-at-top
    train.build_judges(d, data_root=_get(cfg, "data_root"), only=missing)
  return Judges(**{t: load_judge(d, t) for t in JUDGE_NAMES})
