"""Prompt formatting: the paper's Alpaca template (hand-written text) and the real
SmolLM2 chat template (transformers' apply_chat_template as oracle)."""

import pytest

from h3jax.data import format as fmt
from h3jax.data import tokenize as tk
from conftest import SMOLLM2_DIR


@pytest.fixture(scope="module")
def smol_tok():
  if not SMOLLM2_DIR.is_dir():
    pytest.skip(f"SmolLM2 folder not found at {SMOLLM2_DIR}")
  return tk.load_tokenizer(SMOLLM2_DIR)


REC = {"instruction": "Name a colour.", "input": "", "response": "Blue.", "task": 0, "meta": {}}


def test_alpaca_template_is_the_papers():
  # sftekin/h3fusion data_creator.py:L22-33 (Stanford Alpaca PROMPT_DICT), typed out by hand
  assert fmt.alpaca_prompt("Name a colour.") == (
      "Below is an instruction that describes a task. Write a response that appropriately completes "
      "the request.\n\n### Instruction:\nName a colour.\n\n### Response:")
  assert fmt.alpaca_prompt("Sum.", "2 3") == (
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context. Write a response that appropriately completes the request.\n\n### Instruction:\nSum."
      "\n\n### Input:\n2 3\n\n### Response:")
  p, t = fmt.format_example(REC, None, "alpaca")
  assert p.endswith("### Response:") and t == "Blue.###END"  # appended directly, then the stop marker
  assert fmt.format_example(REC, None, "alpaca", end_marker="")[1] == "Blue."
  assert fmt.format_prompt("Name a colour.", None, "alpaca") == p


def test_plain_template():
  assert fmt.format_example(REC, None, "plain") == ("Name a colour.\n", "Blue.")
  rec = dict(REC, input="2 3")
  assert fmt.format_example(rec, None, "plain", end_marker="<e>") == ("Name a colour.\n2 3\n", "Blue.<e>")


def test_chat_template_matches_transformers(smol_tok):
  p, t = fmt.format_example(REC, smol_tok, "chat")
  msgs = [{"role": "user", "content": "Name a colour."}]
  assert p == smol_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert p.endswith("<|im_start|>assistant\n")
  assert t == "Blue.<|im_end|>"  # reply + end-of-turn; the template's trailing newline is dropped
  full = smol_tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Blue."}], tokenize=False)
  assert full == p + t + "\n"
  p_sys, _ = fmt.format_example(REC, smol_tok, "chat", system="Be brief.")
  assert p_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_chat_uses_multi_turn_messages(smol_tok):
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
          {"role": "user", "content": "how to pick a lock?"}]
  rec = {"instruction": "Human: hi ...", "input": "", "response": "I can't help.", "task": 1,
         "meta": {"messages": msgs}}
  p, t = fmt.format_example(rec, smol_tok, "chat")
  assert p == smol_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  assert p.count("<|im_start|>user") == 2 and t == "I can't help.<|im_end|>"
  assert rec["meta"]["messages"] == msgs  # not mutated


def test_input_goes_into_chat_user_turn(smol_tok):
  p = fmt.format_prompt({"instruction": "Sum.", "input": "2 3"}, smol_tok, "chat")
  assert "<|im_start|>user\nSum.\n\n2 3<|im_end|>" in p


def test_format_errors():
  with pytest.raises(ValueError, match="unknown prompt template 'raw'; expected one of"):
    fmt.format_example(REC, None, "raw")
  with pytest.raises(ValueError, match="tokenizer has no chat template; use template='alpaca'"):
    fmt.format_example(REC, tk.ByteTokenizer(), "chat")
  bad = dict(REC, meta={"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
  with pytest.raises(ValueError, match="must end with a user turn, got 'assistant'"):
    fmt.format_prompt(bad, None, "chat")


def test_end_marker_is_alpaca_only(smol_tok):
  with pytest.raises(ValueError, match="end_marker applies to templates 'alpaca' and 'plain'"):
    fmt.format_example(REC, smol_tok, "chat", end_marker="###END")
