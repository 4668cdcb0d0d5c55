"""Vocabulary alignment: merging models whose vocabularies differ (mergekit 0.1.5 `tokenizer_source` /
`tokenizer`).

  tokenizer_source: union            # or base, or a model path (mergekit's legacy key)
  tokenizer:                         # or this block (not both); source defaults to union
    source: union
    pad_to_multiple_of: 8
    tokens:
      <|im_start|>: {source: path/to/chatml_model}                # that model's row
      <|im_end|>: {source: path/to/chatml_model, force: true}     # ... in every input, even those that have it
      <tool>: {source: {kind: model_token, model: path/to/m, token: </s>}}   # another token's row
      <unused>: {source: {kind: zero}}

Output vocabulary: `base` = the base's tokenizer with tokens whose id is >= its config `vocab_size`
stripped (the first model's where there is no base); `union` = the base's plus every token of the other
inputs it lacks (in input order; plain tokens first, then added tokens with their settings); a path = that
model's tokenizer. `tokens` not in it are appended. Every vocabulary-indexed tensor (`VOCAB_AXES`) of every
input is then re-indexed by token string onto the output vocabulary before the merge method runs, so the
method merges rows of one token. An input that lacks a token gets, for it, the row of the only input that
has it; else the base's row; else the mean of the inputs' rows that have it; zeros if none has it. A
`tokens` rule overrides this (with `force`, for every input). Rows past the vocabulary (pad_to_multiple_of)
are each input's mean row. The output's config `vocab_size` is the aligned row count and its tokenizer is
written by transformers. Where nothing changes (same vocabulary everywhere, no padding rows, no `tokens`),
the base's tokenizer files are copied as without `tokenizer_source`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import tempfile
from typing import List, Mapping, Optional

import numpy as np

from h3jax.merging.streaming.settings import MergeConfigError

# Path -> vocabulary axis: the tensors indexed by token id (re-indexed by token string when aligning).
VOCAB_AXES = {"model.embed_tokens.weight": 0, "lm_head.weight": 0, "lm_head.bias": 0}
SOURCES = ("base", "union")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_NONE, _AVG, _ROW, _ZERO = 0, 1, 2, 3  # how an input's missing (or forced) token row is made


@dataclasses.dataclass(frozen=True)
class TokenRule:
  """One entry of a `tokenizer.tokens` block (mergekit's TokenEmbeddingConfig)."""
  token: str
  kind: Optional[str] = None  # None (no source) | "model" | "zero" | "model_token"
  model: Optional[str] = None
  src_token: Optional[str] = None
  src_token_id: Optional[int] = None
  force: bool = False


# ---------------------------------------------------------------------------- config


def parse_config(raw: Mapping, where: str, model_path, inputs) -> dict:
  """The tokenizer keys of a merge config -> MergeSpec fields (tokenizer_source, tokens, pad_to_multiple_of).

  `model_path` normalizes a model reference; `inputs` are every input path (a token's source must be one)."""
  src, block = raw.get("tokenizer_source"), raw.get("tokenizer")
  if src is not None and block is not None:
    raise MergeConfigError(f"{where}: set tokenizer_source or tokenizer, not both (as in mergekit)")
  if block is None:
    return dict(tokenizer_source=None if src is None else _source(src, f"{where}: tokenizer_source", model_path))
  if not isinstance(block, Mapping) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
    raise MergeConfigError(f"{where}: tokenizer must be a mapping with keys source, tokens, pad_to_multiple_of; "
                           f"got {sorted(block) if isinstance(block, Mapping) else block!r}")
  pad = block.get("pad_to_multiple_of")
  if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
    raise MergeConfigError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
  tokens = block.get("tokens") or {}
  if not isinstance(tokens, Mapping) or not all(isinstance(t, str) and t for t in tokens):
    raise MergeConfigError(f"{where}: tokenizer.tokens must map token strings to {{source, force}}")
  rules = tuple(_token_rule(t, c, f"{where}: tokenizer.tokens[{t!r}]", model_path, inputs) for t, c in tokens.items())
  return dict(tokenizer_source=_source(block.get("source", "union"), f"{where}: tokenizer.source", model_path),
              tokens=rules, pad_to_multiple_of=pad)


def source_folder(ref: str) -> pathlib.Path:
  """The folder a model-path tokenizer_source is read from (MODEL of MODEL+LORA)."""
  from h3jax.hf import adapters  # lazily: it imports jax
  return pathlib.Path(adapters.split_ref(ref)[0])


def _source(value, where, model_path) -> str:
  if value in SOURCES:
    return value
  if not (isinstance(value, str) and value) and not isinstance(value, Mapping):
    raise MergeConfigError(f"{where} must be 'base', 'union' or a model path, got {value!r}")
  path = model_path(value, where)
  if not source_folder(path).is_dir():
    raise MergeConfigError(f"{where} {value!r} is neither 'base', 'union' nor an existing model folder")
  return path


def _token_rule(token, cfg, where, model_path, inputs) -> TokenRule:
  cfg = {} if cfg is None else cfg
  if not isinstance(cfg, Mapping) or set(cfg) - {"source", "force"}:
    raise MergeConfigError(f"{where} takes keys source and force, got {cfg!r}")
  force = cfg.get("force", False)
  if not isinstance(force, bool):
    raise MergeConfigError(f"{where}.force must be true or false, got {force!r}")

  def an_input(ref, what):
    p = model_path(ref, f"{where}.{what}")
    if p not in inputs:
      raise MergeConfigError(f"{where}.{what}: {p!r} is not an input of this merge ({', '.join(inputs)})")
    return p

  s = cfg.get("source")
  if s is None:
    return TokenRule(token, force=force)
  if isinstance(s, Mapping) and "kind" in s:
    if s["kind"] == "zero" and set(s) == {"kind"}:
      return TokenRule(token, "zero", force=force)
    if s["kind"] == "model_token" and not set(s) - {"kind", "model", "token", "token_id"} and "model" in s:
      tok, tid = s.get("token"), s.get("token_id")
      if (tok is None) == (tid is None) or tok is not None and not isinstance(tok, str) or \
          tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
        raise MergeConfigError(f"{where}.source: model_token takes a token string or a token_id >= 0 (one of them)")
      return TokenRule(token, "model_token", an_input(s["model"], "source.model"), tok, tid, force)
    raise MergeConfigError(f"{where}.source: expected a model, {{kind: zero}} or {{kind: model_token, model, "
                           f"token | token_id}}, got {s!r}")
  return TokenRule(token, "model", an_input(s, "source"), force=force)


# ---------------------------------------------------------------------------- alignment


class Alignment:
  """Re-indexes every input's vocabulary-indexed tensors onto the output vocabulary (see module doc).

  perms_SV[i, v]: input i's row of output token v (-1: it lacks it); own_SV: that row is used;
  kind_V / src_V / row_V: how the other inputs' row of token v is made (_AVG / _ROW of input src_V, raw
  row row_V / _ZERO)."""

  def __init__(self, tokenizer, n_rows, perms_SV, own_SV, kind_V, src_V, row_V):
    self.tokenizer, self.n_rows = tokenizer, n_rows
    self.perms_SV, self.own_SV, self.kind_V, self.src_V, self.row_V = perms_SV, own_SV, kind_V, src_V, row_V
    self.n_vocab = perms_SV.shape[1]

  def applies(self, name: str) -> bool:
    return name in VOCAB_AXES

  def shape(self, name, shape):
    axis = VOCAB_AXES[name]
    return tuple(shape[:axis]) + (self.n_rows,) + tuple(shape[axis + 1:])

  def tensors(self, name: str, xs: List[np.ndarray], load_dtype=None) -> List[np.ndarray]:
    """Input tensors of `name` (in input order) -> the same re-indexed onto the output vocabulary, in their
    common dtype after the cast to `load_dtype` (mergekit's `dtype`), as mergekit's PermutedVocabulary."""
    axis = VOCAB_AXES[name]
    xs = [np.moveaxis(np.asarray(x) if load_dtype is None else np.asarray(x).astype(load_dtype), axis, 0)
          for x in xs]
    tail = xs[0].shape[1:]
    if any(x.shape[1:] != tail for x in xs):
      raise ValueError(f"{name}: non-vocabulary dimensions differ: {[x.shape for x in xs]}")
    dts = {x.dtype for x in xs}
    dt = dts.pop() if len(dts) == 1 else np.dtype(np.float64 if np.dtype(np.float64) in dts else np.float32)
    xs = [x.astype(dt, copy=False) for x in xs]
    V = self.n_vocab
    default_VD = np.zeros((V,) + tail, dt)
    avg_A = np.nonzero(self.kind_V == _AVG)[0]
    if avg_A.size:  # summed in input order, then divided, in the working dtype (as mergekit)
      acc_AD, n_A = np.zeros((avg_A.size,) + tail, dt), np.zeros(avg_A.size, np.int64)
      for perm_V, x in zip(self.perms_SV, xs):
        has = perm_V[avg_A] >= 0
        acc_AD[has] = acc_AD[has] + x[perm_V[avg_A[has]]]
        n_A += has
      default_VD[avg_A] = acc_AD / n_A.astype(dt).reshape((-1,) + (1,) * len(tail))
    for i, x in enumerate(xs):
      take = (self.kind_V == _ROW) & (self.src_V == i)
      default_VD[take] = x[self.row_V[take]]
    out = []
    for perm_V, own_V, x in zip(self.perms_SV, self.own_SV, xs):
      y_RD = np.empty((self.n_rows,) + tail, dt)
      y_RD[:V] = default_VD
      y_RD[:V][own_V] = x[perm_V[own_V]]
      if self.n_rows > V:  # padding rows: this input's mean row
        acc = np.float64 if dt == np.float64 else np.float32
        y_RD[V:] = y_RD[:V].mean(axis=0, dtype=acc).astype(dt)
      out.append(np.moveaxis(y_RD, 0, axis))
    return out

  def save(self, folder) -> None:
    self.tokenizer.save_pretrained(str(folder), safe_serialization=True)

  @property
  def config_updates(self) -> dict:
    return {"vocab_size": int(self.n_rows)}


def _warn(msg):
  print(f"warning: {msg}", file=sys.stderr, flush=True)


def _has_tokenizer(inp) -> bool:
  return inp.folder is not None and any((inp.folder / f).is_file() for f in _TOKENIZER_FILES)


def _load_tokenizer(folder, what):
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
  except Exception as e:  # noqa: BLE001 -- transformers raises many kinds; one line naming the folder
    raise _TokenizerError(f"cannot load the tokenizer of {what} ({folder}): {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None


class _TokenizerError(ValueError):
  pass


def _vocab_size(inp, fallback: int) -> int:
  """The input's config vocab_size (mergekit's get_vocab_size), else `fallback`."""
  v = (inp.config or {}).get("vocab_size")
  return int(v) if isinstance(v, int) else fallback


def _stripped(tok, vocab_size: int, path):
  """mergekit's get_stripped_tokenizer: drop tokens whose id is >= vocab_size (BPE tokenizers only)."""
  import tokenizers
  unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
  if not unused:
    return tok
  d = json.loads(tok._tokenizer.to_str()) if tok.is_fast else None
  if d is None or d["model"]["type"] != "BPE":
    raise _TokenizerError(f"the tokenizer of {path} has tokens past its vocab_size {vocab_size} and is not a "
                          f"fast BPE tokenizer, so they cannot be stripped (as in mergekit)")
  d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < vocab_size]
  for t in unused:
    d["model"]["vocab"].pop(t, None)

  def keep(m):
    toks = m.split(" ") if isinstance(m, str) and m.count(" ") == 1 else m
    if not isinstance(toks, list):
      raise _TokenizerError(f"the tokenizer of {path} has an unexpected BPE merge {m!r}")
    return not any(t in unused for t in toks)

  d["model"]["merges"] = [m for m in d["model"]["merges"] if keep(m)]
  tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
  return tok


def _union(base_tok, toks_sizes):
  """mergekit's build_union_tokenizer: the base's tokenizer plus the others' plain, then added tokens."""
  import transformers
  out_vocab, out_added = {}, {}
  for tok, size in toks_sizes:
    for t, i in tok.get_vocab().items():
      if i < size:
        out_vocab.setdefault(t, len(out_vocab))
    for i, info in tok.added_tokens_decoder.items():
      if i < size:
        out_added.setdefault(info.content, info)  # the first input's settings win (mergekit warns)
  with tempfile.TemporaryDirectory() as p:  # a copy: the base tokenizer is not changed
    base_tok.save_pretrained(p, legacy_format=False, safe_serialization=True)
    res = transformers.AutoTokenizer.from_pretrained(p, use_fast=True)
  base_vocab = base_tok.get_vocab()
  for t in out_vocab:
    if t not in out_added and t not in base_vocab:
      res.add_tokens(t)
  for info in out_added.values():
    res.add_tokens(info)
  return res


def build(spec, inputs, tokenizer_base: Optional[str] = None) -> Optional[Alignment]:
  """The alignment for `spec` over `inputs` (the driver's inputs: base first, then the models), or None
  where the output keeps the inputs' common vocabulary (the base's tokenizer files are copied).
  Raises ValueError (one line) for inputs that cannot be aligned."""
  if spec.tokenizer_source is None:
    return None
  try:
    return _build(spec, inputs, tokenizer_base)
  except _TokenizerError as e:
    raise ValueError(f"tokenizer_source {spec.tokenizer_source}: {e}") from None


def _build(spec, inputs, tokenizer_base):
  names = [n for n in VOCAB_AXES if inputs[0].has(n)]
  rows_SN = np.array([[i.shape(n)[VOCAB_AXES[n]] if i.has(n) else -1 for n in names] for i in inputs])
  b = next((k for k, i in enumerate(inputs) if i.path == tokenizer_base), 0)
  base = inputs[b]
  if not _has_tokenizer(base):
    if spec.tokenizer_source in SOURCES and not spec.tokens and not spec.pad_to_multiple_of and \
        (rows_SN == rows_SN[:1]).all():
      _warn(f"tokenizer_source {spec.tokenizer_source}: {base.path} has no tokenizer files; the inputs' "
            f"vocabularies (same sizes) are taken to be the same")
      return None
    raise _TokenizerError(f"{base.path} has no tokenizer files, so vocabularies cannot be matched by token")
  base_tok = _load_tokenizer(base.folder, "the base")
  base_vocab_raw = base_tok.get_vocab()
  base_tok = _stripped(base_tok, _vocab_size(base, len(base_vocab_raw)), base.path)
  toks = []
  for k, inp in enumerate(inputs):
    if k == b:
      toks.append(base_tok)
    elif _has_tokenizer(inp):
      toks.append(_load_tokenizer(inp.folder, inp.path))
    else:
      _warn(f"{inp.path} has no tokenizer files; its vocabulary is taken to be {base.path}'s (as mergekit)")
      toks.append(None)
  if spec.tokenizer_source == "base":
    out_tok = base_tok
  elif spec.tokenizer_source == "union":
    order = [b] + [k for k in range(len(inputs)) if k != b and toks[k] is not None]
    out_tok = _union(base_tok, [(toks[k], _vocab_size(inputs[k], toks[k].vocab_size)) for k in order])
  else:
    out_tok = _load_tokenizer(source_folder(spec.tokenizer_source), "tokenizer_source")
  existing = set(out_tok.get_vocab())
  for rule in spec.tokens:
    if rule.token not in existing:
      out_tok.add_tokens(rule.token)
      existing.add(rule.token)
  vocab_out = out_tok.get_vocab()
  V = len(vocab_out)
  if sorted(vocab_out.values()) != list(range(V)):
    raise _TokenizerError(f"the output tokenizer's ids are not 0..{V - 1} (holes in its vocabulary)")
  pad = spec.pad_to_multiple_of
  n_rows = -(-V // pad) * pad if pad else V
  vocabs = [(t if t is not None else base_tok).get_vocab() for t in toks]
  perms_SV = np.full((len(inputs), V), -1, np.int64)
  tok_V = [None] * V
  for t, v in vocab_out.items():
    tok_V[v] = t
  for k, (inp, vocab) in enumerate(zip(inputs, vocabs)):
    size = _vocab_size(inp, len(vocab))
    for t, v in vocab_out.items():
      orig = vocab.get(t)
      if orig is not None and orig < size:  # mergekit warns of (and cannot use) ids past vocab_size
        perms_SV[k, v] = orig
    for n, rows in zip(names, rows_SN[k]):
      if rows >= 0 and perms_SV[k].max(initial=-1) >= rows:
        raise _TokenizerError(f"{inp.path}'s tokenizer has ids up to {perms_SV[k].max()} but its {n} has "
                              f"{rows} rows")
  if spec.tokenizer_source in SOURCES and not spec.tokens and not pad and vocab_out == base_vocab_raw and \
      (perms_SV == np.arange(V)).all() and (rows_SN == V).all():
    return None  # nothing to re-index: the base's tokenizer files are copied unchanged
  present_SV = perms_SV >= 0
  kind_V, src_V, row_V = (np.zeros(V, np.int8), np.zeros(V, np.int64), np.zeros(V, np.int64))
  own_SV = present_SV.copy()
  rules = {r.token: r for r in spec.tokens}
  base_k = b if (spec.base_model is not None or tokenizer_base is not None) else None
  n_V = present_SV.sum(axis=0)
  for v in sorted(set(np.nonzero(n_V < len(inputs))[0].tolist()) | {vocab_out[t] for t in rules}):
    t, rule = tok_V[v], rules.get(tok_V[v])
    if rule is not None and rule.force:
      own_SV[:, v] = False
    elif n_V[v] == len(inputs):
      continue
    if rule is None:  # mergekit's assign_embedding_sources
      if n_V[v] == 1:
        kind_V[v], src_V[v] = _ROW, int(np.argmax(present_SV[:, v]))
        row_V[v] = perms_SV[src_V[v], v]
      elif n_V[v] == 0:
        _warn(f"token {t!r} is in no input; its rows are zero")
        kind_V[v] = _ZERO
      elif base_k is not None and present_SV[base_k, v]:
        kind_V[v], src_V[v], row_V[v] = _ROW, base_k, perms_SV[base_k, v]
      else:
        kind_V[v] = _AVG
      continue
    kind_V[v], src_V[v], row_V[v] = _rule_row(rule, inputs, toks, base_tok, perms_SV, rows_SN, names, v)
  return Alignment(out_tok, n_rows, perms_SV, own_SV, kind_V, src_V, row_V)


def _rule_row(rule, inputs, toks, base_tok, perms_SV, rows_SN, names, v):
  """(kind, input, raw row) of a `tokens` rule (mergekit's compute_default_embedding)."""
  if rule.kind is None:
    raise _TokenizerError(f"token {rule.token!r} needs a source (it is forced or missing in some input)")
  if rule.kind == "zero":
    return _ZERO, 0, 0
  k = [i.path for i in inputs].index(rule.model)
  if rule.kind == "model":
    if perms_SV[k, v] < 0:
      raise _TokenizerError(f"token {rule.token!r}: its source {rule.model} does not have it")
    return _ROW, k, perms_SV[k, v]
  row = rule.src_token_id
  if row is None:
    row = (toks[k] if toks[k] is not None else base_tok).get_vocab().get(rule.src_token)
    if row is None:
      raise _TokenizerError(f"token {rule.token!r}: {rule.src_token!r} is not in {rule.model}'s tokenizer")
  if any(0 <= r <= row for r in rows_SN[k]):
    raise _TokenizerError(f"token {rule.token!r}: token id {row} is out of range for {rule.model} "
                          f"({dict(zip(names, rows_SN[k].tolist()))} rows)")
  return _ROW, k, row
