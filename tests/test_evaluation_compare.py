"""runner.compare (the pipeline's final step) on two tiny HF folders with a real byte-level tokenizer."""

import json

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from h3jax.evaluation import runner
from tiny_hf import make_model, save_model

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer():
  """Byte-level BPE without merges: 3 specials + 256 bytes = 259 ids, with a chat template."""
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
  vocab.update({c: i + 3 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>")
  fast.chat_template = CHAT
  return fast


def test_compare_two_hf_folders(tmp_path, data_root, capsys):
  dirs = {}
  for name, seed in (("base", 0), ("fused", 1)):
    d = tmp_path / name
    save_model(make_model("llama_gqa_linear", seed=seed, vocab_size=259), d)
    byte_tokenizer().save_pretrained(d)
    dirs[name] = str(d)
  config = runner.default_config()
  config.data_root = str(data_root)
  config.sets = ("xstest_safe", "truthfulqa_mc")
  config.batch_size = 2
  config.judges.kind = "none"
  config.prompt_template = "chat"
  config.generation.max_new_tokens = 4
  res = runner.compare(dirs, tmp_path / "eval", limit=1, config=config)
  out = capsys.readouterr().out
  assert "| metric | n | base | fused |" in out and "honest/mc2" in out
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert list(saved["models"]) == ["base", "fused"] == list(res["models"])
  assert saved["models"]["base"]["metrics"]["honest/mc1"]["n"] == 1
  assert saved["models"]["base"]["skipped"] == ["harmless/xstest_safe: no refusal judge"]
  assert {"radar.png", "axis_bars.png"} <= set(saved["plots"])
  samples = (tmp_path / "eval" / "samples_fused.jsonl").read_text().splitlines()
  assert json.loads(samples[0])["set"] == "xstest_safe"
  assert saved["settings"]["prompt_template"] == "chat"
  config.prompt_template = "nope"
  with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
    runner.prompt_template(config, byte_tokenizer())
