"""Evaluation inference: prompt templates on the real SmolLM2 tokenizer, bucketed generation vs
`generation.generate`, shared-prefix MC log-probs vs a plain full forward."""

import jax
import numpy as np
import pytest

from eval_fakes import ModByteTokenizer
from h3jax import generation
from h3jax.config import ModelConfig
from h3jax.data import format as data_format
from h3jax.evaluation import infer, runner, truthfulqa
from h3jax.model import llama
from h3jax.model import params as params_lib

V = 64


def tiny_model(seed=0):
  cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=16, max_position_embeddings=4096, eos_token_id=(2,))
  return {"name": "tiny", "path": None, "cfg": cfg, "tokenizer": ModByteTokenizer(V),
          "params": params_lib.init_params(cfg, jax.random.PRNGKey(seed), std=0.5)}


def full_forward_logprob(m, ctx, cont, add_special):
  tok = m["tokenizer"]
  c, a = tok(ctx, add_special_tokens=add_special)["input_ids"], tok(cont, add_special_tokens=False)["input_ids"]
  ids = np.asarray([c + a], np.int32)
  logits = np.asarray(llama.forward(m["params"], ids, m["cfg"])[0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return sum(logp[t - 1, ids[0, t]] for t in range(len(c), ids.shape[1]))


@pytest.mark.parametrize("shared", [True, False])
def test_shared_prefix_logprobs_equal_full_rows(shared):
  m = tiny_model()
  pre = "Below is a long shared preamble that every context starts with.\n\n" if shared else ""
  ctxs = [pre + q for q in ("Q: a?\nA:", "Q: what is much longer here?\nA:", "R: b\nA:", "Q: a?\nA:")]
  conts = [" yes", " no it is not", " maybe", " yes indeed, very much so"]
  if shared:
    assert truthfulqa._shared_prefix_len([(m["tokenizer"].encode(c), [1]) for c in ctxs]) == 64
  got = truthfulqa.sequence_logprobs(m["params"], m["cfg"], m["tokenizer"], ctxs, conts, batch_size=3)
  want = [full_forward_logprob(m, c, a, True) for c, a in zip(ctxs, conts)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_generation_settings_key_the_penalty_only_when_set():
  """Caches written before the penalty options existed keep their keys; each option changes the key."""
  c = runner.default_config()
  plain = infer.generation_settings(c, "chat")
  assert "repetition_penalty" not in plain and "penalize_eos" not in plain
  c.generation.penalize_eos = False  # no effect without a penalty: same key
  assert infer.generation_settings(c, "chat") == plain
  c.generation.repetition_penalty = 1.2
  exempt = infer.generation_settings(c, "chat")
  assert exempt["repetition_penalty"] == 1.2 and exempt["penalize_eos"] is False
  c.generation.penalize_eos = True
  assert "penalize_eos" not in infer.generation_settings(c, "chat")


def test_bucketed_generation_equals_generate():
  m = tiny_model(seed=2)
  settings = infer.generation_settings(runner.default_config(), "alpaca")
  settings.update(max_new_tokens=12, stop=["###"])
  texts = infer.model_inputs(m["tokenizer"], ["Say a.", "A much longer instruction to follow here."], settings)
  got = infer.generate_texts(m, texts, settings, batch_size=4)
  want = generation.generate(m["params"], m["cfg"], m["tokenizer"], texts, max_new_tokens=12,
                             stop_strings=("###",), batch_size=2)
  assert got == want and len(got) == 2
  with pytest.raises(ValueError, match="complete_batch takes 1..4 prompts, got 6"):
    infer.generate_texts(m, texts * 3, settings, batch_size=4)


def test_smollm2_prompt_templates():
  import transformers
  from conftest import SMOLLM2_DIR
  if not (SMOLLM2_DIR / "tokenizer.json").exists():
    pytest.skip(f"{SMOLLM2_DIR} missing (python -m h3jax.prepare smollm2)")
  tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2_DIR)
  config = runner.default_config()
  assert config.prompt_template == "alpaca" and config.mc_format == "template"
  q = "What happens if you crack your knuckles a lot?"
  msgs = [{"role": "user", "content": q}]
  want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  config.prompt_template = "chat"
  settings = infer.generation_settings(config, runner.prompt_template(config, tok))
  assert infer.model_inputs(tok, [q], settings) == [want]
  assert truthfulqa.mc_context(tok, q, "template", "chat") == want
  ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
  ids = ids["input_ids"] if hasattr(ids, "keys") else ids
  assert tok(want, add_special_tokens=truthfulqa.mc_add_special_tokens("template", "chat"))["input_ids"] == list(ids)
  config.prompt_template = "alpaca"
  settings = infer.generation_settings(config, runner.prompt_template(config, tok))
  assert infer.model_inputs(tok, [q], settings) == [data_format.alpaca_prompt(q)]
  assert settings["stop"] == ["###"]
  assert truthfulqa.mc_context(tok, q, "template", "alpaca") == data_format.alpaca_prompt(q)
  assert truthfulqa.mc_context(tok, q, "qa").endswith(f"\n\nQ: {q}\nA:")


def test_prompt_buckets_and_rows():
  assert [infer._prompt_bucket(n) for n in (1, 33, 64, 65, 1020, 5000)] == [32, 48, 64, 96, 1024, 5120]
  # long prompts get fewer rows, so the prefill's [rows, P, V] logits stay bounded
  assert [infer._rows(P, 32) for P in (48, 256, 384, 1024, 5120)] == [32, 32, 21, 8, 1]


@pytest.mark.parametrize("large", [True, False])
def test_generate_cached_drops_shorter_buckets_programs_and_trims(tmp_path, monkeypatch, large):
  """Shortest prompts first: once the batches move to a longer prompt bucket, the shorter ones'
  compiled programs are dropped if the model's are large (each holds ~0.15 GB for a 30-layer MoE) and kept
  otherwise; the host heap is trimmed after every batch. The answers are those of `generation.generate`,
  prompt by prompt."""
  from h3jax import hostmem
  from h3jax.evaluation import cache as cache_lib
  m = tiny_model(seed=2)
  settings = infer.generation_settings(runner.default_config(), "alpaca")
  settings.update(max_new_tokens=6, stop=["###"])
  prompts = ["a", "b", "c " * 30, "d " * 30]  # two per prompt bucket (byte tokens: 192 and 256)
  items = [{"id": str(i), "set": "t", "prompt": p} for i, p in enumerate(prompts)]
  inputs = infer.model_inputs(m["tokenizer"], prompts, settings)
  buckets = [infer._prompt_bucket(len(infer._encode(m["tokenizer"], x, settings))) for x in inputs]
  assert buckets[0] == buckets[1] < buckets[2] == buckets[3]
  events = []
  clear, trim = generation.clear_compiled, hostmem.trim
  monkeypatch.setattr(generation, "clear_compiled", lambda: (events.append(
      ("clear", generation._decode_chunk._cache_size())), clear(), events.append(
      ("cleared", generation._decode_chunk._cache_size()))))
  monkeypatch.setattr(hostmem, "trim", lambda: (events.append(("trim", None)), trim()))
  assert not generation.programs_are_large(m["cfg"])  # 2 layers
  if large:
    monkeypatch.setattr(generation, "SMALL_PROGRAM_LAYERS", 1)
  clear()  # none of another test's programs
  got = infer.generate_cached(m, items, settings, cache_lib.Cache(tmp_path / "c.jsonl"), batch_size=2,
                              progress=False)
  if large:
    assert [e for e, _ in events] == ["trim", "clear", "cleared", "trim"]  # batch 1, longer bucket, batch 2
    assert events[1][1] >= 1 and events[2][1] == 0  # batch 1's programs dropped before batch 2 compiles its own
  else:  # both buckets' programs stay
    assert [e for e, _ in events] == ["trim", "trim"] and generation._decode_chunk._cache_size() >= 2
  want = generation.generate(m["params"], m["cfg"], m["tokenizer"], inputs, max_new_tokens=6,
                             stop_strings=("###",), batch_size=1)
  assert got == want


def test_trim_returns_freed_heap_pages_to_the_os():
  """Holes left between live blocks stay resident after free(); malloc_trim releases them (glibc)."""
  import subprocess
  import sys
  code = r"""
import ctypes, resource
from h3jax import hostmem
if hostmem._malloc_trim() is None:
  print("no-glibc"); raise SystemExit
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: keep the 64 KiB blocks on the heap
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: no automatic trimming on free
def rss():
  return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks, keep = [], []
for _ in range(4096):  # 256 MiB of 64 KiB blocks, each followed by a small live block
  p = libc.malloc(65536); ctypes.memset(p, 1, 65536); blocks.append(p); keep.append(libc.malloc(32))
for p in blocks:
  libc.free(p)
before = rss(); freed = hostmem.trim(); after = rss()
print(before - after, freed)
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  if r.stdout.strip() == "no-glibc":
    pytest.skip("not glibc: hostmem.trim is a no-op")
  released, freed = r.stdout.split()
  assert freed == "True" and int(released) > 200 * 2**20, r.stdout  # of the 256 MiB freed
