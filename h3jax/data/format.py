"""Prompt formatting: the paper's Alpaca template and the model's chat template.

A record (schema in `h3jax.data.splits`) becomes a (prompt, target) text pair;
the loss goes on the target only. The same `format_prompt` builds generation
prompts, so a model is evaluated with exactly the text it was trained on.

  alpaca  H^3Fusion / Stanford Alpaca (sftekin/h3fusion data_creator.py:L22-33):
          "Below is an instruction ...\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:"
          (the "with input" variant when `input` is set); the target follows
          "### Response:" directly (no space) and ends with the stop marker
          "###END", as the paper trains it. BOS comes from the tokenizer's own
          special-token rule (`add_special_tokens=True`), no EOS.
  chat    the tokenizer's chat template: prompt = template(messages, generation
          prompt), target = the rest of template(messages + assistant reply),
          i.e. the reply and the template's end-of-turn token. Multi-turn
          HH-RLHF records carry their dialogue in meta["messages"].
  plain   "{instruction}\n" (input on the next line), target = the response: for
          tiny models and byte tokenizers. BOS as for alpaca, no end marker.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n")
END_MARKER = "###END"  # the paper's stop string (sftekin/h3fusion data_creator.py:L152)
TEMPLATES = ("alpaca", "chat", "plain")


def check_template(template: str) -> str:
  if template not in TEMPLATES:
    raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")
  return template


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """The Alpaca prompt, ending in "### Response:" (the target follows without a separator)."""
  if input_text:
    return (f"{ALPACA_PREAMBLE_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}"
            "\n\n### Response:")
  return f"{ALPACA_PREAMBLE}### Instruction:\n{instruction}\n\n### Response:"


def chat_messages(record: dict, system: Optional[str] = None) -> List[dict]:
  """The dialogue to put before the reply: meta["messages"] if present, else one user turn."""
  msgs = (record.get("meta") or {}).get("messages")
  if not msgs:
    content = record["instruction"]
    if record.get("input"):
      content = f"{content}\n\n{record['input']}"
    msgs = [{"role": "user", "content": content}]
  msgs = [dict(m) for m in msgs]
  if msgs[-1]["role"] != "user":
    raise ValueError(f"a chat prompt must end with a user turn, got {msgs[-1]['role']!r}")
  if system is not None:
    msgs = [{"role": "system", "content": system}] + msgs
  return msgs


def _chat_template(tokenizer, messages, add_generation_prompt: bool) -> str:
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("template='chat' but the tokenizer has no chat template; use template='alpaca'")
  return tokenizer.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


def format_prompt(record, tokenizer, template: str, *, system: Optional[str] = None) -> str:
  """The prompt text of a record (or of a bare instruction string)."""
  if isinstance(record, str):
    record = {"instruction": record}
  if check_template(template) == "alpaca":
    return alpaca_prompt(record["instruction"], record.get("input", ""))
  if template == "plain":
    return "".join(f"{t}\n" for t in (record["instruction"], record.get("input")) if t)
  return _chat_template(tokenizer, chat_messages(record, system), True)


def format_example(record: dict, tokenizer, template: str, *, end_marker: Optional[str] = None,
                   system: Optional[str] = None) -> Tuple[str, str]:
  """(prompt, target) texts. end_marker: alpaca default "###END", plain default "" (chat: none)."""
  prompt = format_prompt(record, tokenizer, template, system=system)
  if template == "alpaca":
    return prompt, record["response"] + (END_MARKER if end_marker is None else end_marker)
  if template == "plain":
    return prompt, record["response"] + (end_marker or "")
  if end_marker:
    raise ValueError("end_marker applies to templates 'alpaca' and 'plain'; the chat template ends turns itself")
  msgs = chat_messages(record, system) + [{"role": "assistant", "content": record["response"]}]
  full = _chat_template(tokenizer, msgs, False)
  if not full.startswith(prompt):
    raise ValueError("the chat template renders the dialogue differently once the reply is added, so "
                     "the prompt/reply boundary is undefined; use template='alpaca'")
  # drop whitespace after the end-of-turn token: the model stops there, the newline is never generated
  return prompt, full[len(prompt):].rstrip("\n")
