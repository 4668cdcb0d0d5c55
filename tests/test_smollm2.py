"""The real SmolLM2-135M-Instruct (made by `python -m h3jax.prepare smollm2`) against transformers."""

import numpy as np
import pytest
import torch
import transformers

import h3jax
from conftest import SMOLLM2_DIR
from h3jax import generation
from h3jax.model import llama
from numerics import assert_greedy_equal, max_err_rel

PROMPT = "What is the capital of France? Explain its history in a few sentences."


@pytest.fixture(scope="module")
def smollm2():
  if not (SMOLLM2_DIR / "config.json").exists():
    pytest.fail(f"{SMOLLM2_DIR} missing: run `python -m h3jax.prepare smollm2 --out {SMOLLM2_DIR}` "
                "(`make test` does this)")
  tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2_DIR)
  hf = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
  cfg, params = h3jax.load_pretrained(SMOLLM2_DIR)
  return tok, hf, cfg, params


def test_config_is_smollm2_135m(smollm2):
  _, _, cfg, _ = smollm2
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
  assert cfg.tie_word_embeddings


def test_chat_prompt_logits_and_greedy_continuation(smollm2):
  tok, hf, cfg, params = smollm2
  text = generation.format_prompts(tok, [PROMPT], chat=True)[0]
  ids = tok(text, add_special_tokens=False, return_tensors="np")["input_ids"]
  with torch.no_grad():
    ref_logits = hf(torch.as_tensor(ids)).logits.numpy()
    gen = hf.generate(torch.as_tensor(ids), do_sample=False, max_new_tokens=32, pad_token_id=tok.pad_token_id,
                      output_scores=True, return_dict_in_generate=True)
  ref = gen.sequences[0, ids.shape[1]:].numpy()
  ours = np.asarray(llama.forward_jit(params, ids, cfg))
  # 30 layers of real weights in float32 against torch: max error within 1e-4 of the largest logit
  assert max_err_rel(ours, ref_logits) <= 1e-4
  toks, lengths = generation.generate_tokens(params, cfg, ids, np.ones_like(ids), max_new_tokens=32,
                                             eos_token_ids=[tok.eos_token_id])
  # token-identical up to a near-tie of HF's logits (another CPU's summation order may break it)
  assert assert_greedy_equal(toks[:1, :len(ref)], ref[None], [s.numpy() for s in gen.scores]) >= 8
  assert "Paris" in tok.decode(toks[0])


def test_text_generate_batch_with_stop_string(smollm2):
  tok, _, cfg, params = smollm2
  prompts = [PROMPT, "Name a primary colour."]
  outs = h3jax.generate(params, cfg, tok, prompts, chat=True, max_new_tokens=24, stop_strings=["."], batch_size=2)
  assert len(outs) == 2 and "Paris" in outs[0]
  assert all("." not in o for o in outs)  # cut at the stop string
