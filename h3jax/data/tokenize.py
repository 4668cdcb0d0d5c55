"""Tokenization with response-only loss masks, a max length and a truncation policy.

An example is {"input_ids_T": int32[T], "loss_mask_T": int32[T], "task": int,
"truncated": bool}; loss_mask is 1 on target tokens (the reply, plus "###END"
or the end-of-turn token), 0 on the prompt. The trainer predicts token t from
t-1 and weighs it by loss_mask[t].

Prompt and target are tokenized separately and concatenated, so the boundary
is exact (the paper tokenizes them jointly and can be off by one) and the
prompt tokens are those a generation run starts from.

Truncation, when prompt + target exceed max_len: the prompt keeps its *last*
tokens (the instruction's end and "### Response:" / the generation prompt),
at least ceil(min_prompt_frac * max_len) of them when it has that many; the
target keeps its *start*. A leading BOS survives left-truncation.

Tokenizers: a `transformers` tokenizer (`load_tokenizer(folder)`), or
`ByteTokenizer` for tiny test models. Both expose encode(text,
add_special_tokens=...), bos/eos/pad_token_id and the chat-template API.
"""

from __future__ import annotations

import functools
import hashlib
import math
import pathlib
from typing import List, Optional, Sequence

import numpy as np

from h3jax.data import format as fmt

TASKS = ("helpful", "harmless", "honest")  # task label = index


class ByteTokenizer:
  """UTF-8 bytes as ids 3..258; pad 0, bos 1, eos 2. No chat template."""
  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
  chat_template = None
  vocab_size = 259

  def __len__(self):
    return self.vocab_size

  def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
    ids = [b + 3 for b in text.encode("utf-8")]
    return [self.bos_token_id] + ids if add_special_tokens else ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def load_tokenizer(spec):
  """'bytes' -> ByteTokenizer; a local HF model folder -> its transformers tokenizer."""
  if spec == "bytes":
    return ByteTokenizer()
  path = pathlib.Path(spec)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer: {str(path)!r} is not a folder (expected 'bytes' or an HF model "
                            "folder with tokenizer.json or tokenizer.model + tokenizer_config.json)")
  if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    raise FileNotFoundError(f"model folder {str(path)!r} has no tokenizer (expected tokenizer.json, "
                            "tokenizer.model or vocab.json next to tokenizer_config.json)")
  return auto_tokenizer(path)


# What AutoTokenizer.from_pretrained reads from a folder (config.json names the tokenizer class).
_TOKENIZER_INPUTS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                     "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                     "config.json")


def auto_tokenizer(folder):
  """transformers.AutoTokenizer of `folder`, one object per process for each distinct content of the files
  it reads (`_TOKENIZER_INPUTS`): folders holding the same tokenizer share it, and a folder whose files
  change loads again. Loading SmolLM2's takes ~0.4 s, and an in-process study stage evaluates several model
  folders that all carry copies of one tokenizer (the tiny study: 15 loads before, 3 now). Callers must not
  modify the returned tokenizer (h3jax.merging.streaming.vocab, which adds tokens, loads its own)."""
  path = pathlib.Path(folder).resolve()
  key = tuple((n, _file_digest(f)) for n in _TOKENIZER_INPUTS if (f := path / n).is_file())
  if key not in _TOKENIZERS:
    from transformers import AutoTokenizer  # lazy: tiny runs never import transformers
    while len(_TOKENIZERS) >= 8:
      _TOKENIZERS.pop(next(iter(_TOKENIZERS)))  # the oldest
    _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(path))
  return _TOKENIZERS[key]


_TOKENIZERS: dict = {}  # the files' (name, digest) pairs -> the tokenizer of the first folder seen with them


def _file_digest(f: pathlib.Path) -> str:
  s = f.stat()
  return _digest(str(f), (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns))


@functools.lru_cache(maxsize=256)
def _digest(path: str, stamp: tuple) -> str:
  del stamp  # part of the cache key only: a rewritten file is read again
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def pad_id(tokenizer) -> int:
  """Pad id: the tokenizer's, else EOS, else 0 (padding is masked everywhere)."""
  for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if v is not None:
      return int(v)
  return 0


def task_label(record) -> int:
  t = record.get("task")
  if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < len(TASKS):
    raise ValueError(f"record has task {t!r}; expected 0 (helpful), 1 (harmless) or 2 (honest): "
                     f"{str(record.get('instruction'))[:60]!r}")
  return int(t)


def truncate(prompt_ids: Sequence[int], target_ids: Sequence[int], max_len: int, *,
             min_prompt_frac: float = 0.5, bos_id: Optional[int] = None):
  """(prompt, target) cut to max_len tokens together by the policy in the module docstring."""
  p, t = list(prompt_ids), list(target_ids)
  if len(p) + len(t) <= max_len:
    return p, t, False
  keep_p = min(len(p), max(max_len - len(t), math.ceil(min_prompt_frac * max_len)))
  keep_p = min(keep_p, max_len - 1)  # at least one target token survives
  if keep_p <= 0:
    p = []
  elif bos_id is not None and p[0] == bos_id and keep_p < len(p):
    p = p[:1] + p[len(p) - keep_p + 1:]
  else:
    p = p[len(p) - keep_p:]
  return p, t[:max_len - len(p)], True


def tokenize_example(record: dict, tokenizer, template: str, max_len: int, *,
                     end_marker: Optional[str] = None, add_eos: bool = False,
                     min_prompt_frac: float = 0.5, system: Optional[str] = None) -> dict:
  """One record -> {input_ids, loss_mask, task, truncated} (see the module docstring)."""
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}")
  prompt, target = fmt.format_example(record, tokenizer, template, end_marker=end_marker, system=system)
  # alpaca/plain: BOS by the tokenizer's rule; chat templates already spell out their special tokens
  p = tokenizer.encode(prompt, add_special_tokens=(template != "chat"))
  t = tokenizer.encode(target, add_special_tokens=False)
  if add_eos:
    if tokenizer.eos_token_id is None:
      raise ValueError("add_eos=True but the tokenizer has no EOS token")
    t = t + [tokenizer.eos_token_id]
  if not t:
    raise ValueError(f"record has an empty target: {record['instruction'][:60]!r}")
  bos = tokenizer.bos_token_id if template != "chat" else None
  p, t, cut = truncate(p, t, max_len, min_prompt_frac=min_prompt_frac, bos_id=bos)
  return {"input_ids_T": np.asarray(p + t, np.int32),
          "loss_mask_T": np.asarray([0] * len(p) + [1] * len(t), np.int32),
          "task": task_label(record), "truncated": cut}


def tokenize_records(records: Sequence[dict], tokenizer, template: str, max_len: int, **kw) -> List[dict]:
  """tokenize_example over records (kw: end_marker, add_eos, min_prompt_frac, system)."""
  fmt.check_template(template)
  return [tokenize_example(r, tokenizer, template, max_len, **kw) for r in records]
