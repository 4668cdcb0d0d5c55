"""Test-only helpers for the evaluation tests: a tiny callable tokenizer and fake judges.

The fake judges are deterministic functions of the text so plumbing tests can
predict every rate; they are never used outside tests.
"""

from __future__ import annotations

import numpy as np


class ModByteTokenizer:
  """ids = 3 + (utf-8 byte % (V - 3)); pad 0, bos 1, eos 2; no chat template."""
  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
  chat_template = None

  def __init__(self, vocab_size: int = 64):
    self.vocab_size = vocab_size

  def encode(self, text, add_special_tokens=True):
    ids = [3 + b % (self.vocab_size - 3) for b in text.encode("utf-8")]
    return [self.bos_token_id] + ids if add_special_tokens else ids

  def __call__(self, text, add_special_tokens=True):
    return {"input_ids": self.encode(text, add_special_tokens)}

  def decode(self, ids, skip_special_tokens=True):
    return "".join(chr(97 + (int(i) - 3) % 26) for i in ids if int(i) >= 3)

  def batch_decode(self, rows, skip_special_tokens=True):
    return [self.decode(r) for r in rows]


class FakeRefusalJudge:
  """P(refusal) = 1 when the response has an even number of characters."""

  def score(self, prompts, responses):
    assert len(prompts) == len(responses)
    return np.array([1.0 if len(r) % 2 == 0 else 0.0 for r in responses])


class FakeYesJudge:
  """P(yes) = 0.9 when the answer contains the letter 'a', else 0.1."""

  def score(self, questions, answers):
    return np.array([0.9 if "a" in a else 0.1 for a in answers])


class FakePairwiseJudge:
  """Prefers the longer text: P(a better) = 1, 0.5 or 0."""

  def prefer(self, instructions, a, b):
    return np.array([float(len(x) > len(y)) + 0.5 * (len(x) == len(y)) for x, y in zip(a, b)])


def fake_judges():
  return {"refusal": FakeRefusalJudge(), "truth": FakeYesJudge(), "info": FakeYesJudge(),
          "pairwise": FakePairwiseJudge()}
