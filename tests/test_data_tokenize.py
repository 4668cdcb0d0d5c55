"""Tokenization on the real SmolLM2 tokenizer: loss only on response tokens,
exact prompt/target boundary, truncation policy (hand-computed cases)."""

import json
import math

import hypothesis
import hypothesis.strategies as st
import pytest

from conftest import SMOLLM2_DIR
from h3jax.data import format as fmt
from h3jax.data import splits
from h3jax.data import tokenize as tk


@pytest.fixture(scope="module")
def smol_tok():
  if not SMOLLM2_DIR.is_dir():
    pytest.skip(f"SmolLM2 folder not found at {SMOLLM2_DIR}")
  return tk.load_tokenizer(SMOLLM2_DIR)


@pytest.fixture(scope="module")
def sample(data_root):
  """A few real train records per axis, including multi-turn HH dialogues."""
  harm = splits.harmlessness("train", data_root)
  multi = [r for r in harm if len(r["meta"]["messages"]) > 1][:3]
  return (splits.helpfulness("train", data_root)[:4] + harm[:3] + multi
          + splits.honesty("train", data_root)[:4])


def _check_mask(ex, tok, prompt, target):
  ids, m = ex["input_ids_T"], ex["loss_mask_T"]
  n_p = int((m == 0).sum())
  assert (m[:n_p] == 0).all() and (m[n_p:] == 1).all() and m[-1] == 1  # one prompt span, then the target
  # the masked tokens are exactly the target text's tokens; the rest exactly the prompt's
  assert tok.decode(ids[m == 1], skip_special_tokens=False) == target
  assert tok.decode(ids[m == 0], skip_special_tokens=False) == prompt
  return n_p


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_loss_only_on_response_tokens(sample, smol_tok, template):
  for rec in sample:
    ex = tk.tokenize_example(rec, smol_tok, template, max_len=4096)
    prompt, target = fmt.format_example(rec, smol_tok, template)
    n_p = _check_mask(ex, smol_tok, prompt, target)
    assert not ex["truncated"] and ex["task"] == rec["task"]
    # the prompt tokens are those a generation run starts from
    assert ex["input_ids_T"][:n_p].tolist() == smol_tok(prompt, add_special_tokens=template == "alpaca").input_ids
    if template == "alpaca":
      assert target == rec["response"] + "###END"
    else:
      assert target == rec["response"].strip() + "<|im_end|>"
      assert ex["input_ids_T"][-1] == smol_tok.eos_token_id  # SmolLM2 ends turns with its EOS


def test_add_eos(smol_tok):
  rec = {"instruction": "Hi", "response": "Hello", "task": 0}
  ex = tk.tokenize_example(rec, smol_tok, "alpaca", 64, add_eos=True, end_marker="")
  assert ex["input_ids_T"][-1] == smol_tok.eos_token_id
  assert smol_tok.decode(ex["input_ids_T"][ex["loss_mask_T"] == 1], skip_special_tokens=False) == "Hello<|im_end|>"


def test_byte_tokenizer_adds_bos_to_alpaca_prompt():
  bt = tk.ByteTokenizer()
  ex = tk.tokenize_example({"instruction": "x", "response": "ab", "task": 2}, bt, "alpaca", 512, end_marker="")
  assert ex["input_ids_T"][0] == bt.bos_token_id
  assert ex["input_ids_T"][-2:].tolist() == [ord("a") + 3, ord("b") + 3] and ex["loss_mask_T"].sum() == 2


@pytest.mark.parametrize("p, t, max_len, want_p, want_t", [
    ([1, 10, 11, 12], [20, 21], 6, [1, 10, 11, 12], [20, 21]),  # fits: untouched
    ([1, 10, 11, 12, 13, 14], [20, 21], 6, [1, 12, 13, 14], [20, 21]),  # prompt left-cut, BOS kept
    ([1, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25], 6, [1, 13, 14], [20, 21, 22]),  # half each
    ([10, 11], [20, 21, 22, 23, 24, 25], 6, [10, 11], [20, 21, 22, 23]),  # short prompt whole
    ([10, 11, 12, 13], [20, 21], 5, [11, 12, 13], [20, 21]),  # no BOS: plain left cut
])
def test_truncate_hand_cases(p, t, max_len, want_p, want_t):
  got_p, got_t, cut = tk.truncate(p, t, max_len, bos_id=1)
  assert (got_p, got_t) == (want_p, want_t) and cut == (len(p) + len(t) > max_len)


def test_truncate_min_prompt_frac():
  p, t = list(range(100, 110)), list(range(200, 210))
  assert tk.truncate(p, t, 10, min_prompt_frac=0.2) == ([108, 109], list(range(200, 208)), True)
  assert tk.truncate(p, t, 10, min_prompt_frac=1.0) == (p[-9:], [200], True)  # >= 1 target token


def test_truncation_on_a_long_real_record(sample, smol_tok):
  rec = max(sample, key=lambda r: len(r["instruction"]) + len(r["response"]))
  for template in ("alpaca", "chat"):
    ex = tk.tokenize_example(rec, smol_tok, template, max_len=48)
    prompt, target = fmt.format_example(rec, smol_tok, template)
    ids, m = ex["input_ids_T"], ex["loss_mask_T"]
    assert ex["truncated"] and len(ids) == 48 and m.sum() == 24  # half prompt, half target
    kept_target = smol_tok.decode(ids[m == 1], skip_special_tokens=False)
    kept_prompt = smol_tok.decode(ids[m == 0], skip_special_tokens=False)
    assert target.startswith(kept_target) and prompt.endswith(kept_prompt)  # response start, prompt end


def test_tokenize_errors(smol_tok, tmp_path):
  with pytest.raises(ValueError, match=r"record has task 3; expected 0 \(helpful\), 1 \(harmless\) or 2"):
    tk.tokenize_example({"instruction": "a", "response": "b", "task": 3}, smol_tok, "alpaca", 32)
  with pytest.raises(ValueError, match="max_len must be >= 2"):
    tk.tokenize_example({"instruction": "a", "response": "b", "task": 0}, smol_tok, "alpaca", 1)
  with pytest.raises(ValueError, match="empty target"):
    tk.tokenize_example({"instruction": "a", "response": "", "task": 0}, smol_tok, "alpaca", 32, end_marker="")
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    tk.load_tokenizer(tmp_path / "nope")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="has no tokenizer \\(expected tokenizer.json"):
    tk.load_tokenizer(tmp_path)
  assert tk.pad_id(smol_tok) == smol_tok.pad_token_id == 2 and tk.pad_id(tk.ByteTokenizer()) == 0


def test_tokenizer_is_loaded_once_per_content_until_its_files_change(tmp_path):
  import shutil
  from h3jax.hf import loader
  d = tmp_path / "tok"
  d.mkdir()
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if (SMOLLM2_DIR / f).is_file():
      shutil.copy2(SMOLLM2_DIR / f, d / f)
  a = tk.load_tokenizer(d)
  assert loader.tokenizer_from_dir(d) is a and tk.load_tokenizer(str(d) + "/") is a  # one object per folder
  assert a.encode("hi there") == tk.load_tokenizer(SMOLLM2_DIR).encode("hi there")
  cfg = json.loads((d / "tokenizer_config.json").read_text())
  cfg["model_max_length"] = 77  # an edited tokenizer file is read again
  (d / "tokenizer_config.json").write_text(json.dumps(cfg))
  b = tk.load_tokenizer(d)
  assert b is not a and b.model_max_length == 77 and a.model_max_length != 77
  # another folder holding the same files (a copy, other mtimes: an exported model's) shares the object;
  # one whose files differ in a byte does not
  same, other = tmp_path / "same", tmp_path / "other"
  shutil.copytree(d, same, copy_function=shutil.copy)
  shutil.copytree(d, other)
  (other / "tokenizer_config.json").write_text(json.dumps(cfg) + " ")
  assert tk.load_tokenizer(same) is b and tk.load_tokenizer(other) is not b
  assert tk.load_tokenizer(other).model_max_length == 77


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(n_p=st.integers(0, 40), n_t=st.integers(1, 40), max_len=st.integers(2, 50),
                  frac=st.floats(0.0, 1.0), bos=st.booleans())
def test_truncate_invariants(n_p, n_t, max_len, frac, bos):
  p = ([1] if bos and n_p else []) + list(range(100, 100 + n_p - (1 if bos and n_p else 0)))
  t = list(range(500, 500 + n_t))
  got_p, got_t, cut = tk.truncate(p, t, max_len, min_prompt_frac=frac, bos_id=1)
  if len(p) + len(t) <= max_len:
    assert (got_p, got_t, cut) == (p, t, False)
    return
  assert cut and len(got_p) + len(got_t) <= max_len and got_t and got_t == t[:len(got_t)]
  body = got_p[1:] if (bos and got_p and p[0] == 1 and len(got_p) < len(p)) else got_p
  assert body == p[len(p) - len(body):]  # the prompt keeps its end
  if bos and got_p and len(got_p) < len(p):
    assert got_p[0] == 1  # BOS survives
  assert len(got_p) + len(got_t) == max_len  # nothing wasted
  assert len(got_p) >= min(len(p), max_len - 1, math.ceil(frac * max_len))  # the prompt's share
