"""Decode params packed for the CPU kernel (h3jax/model/panels.py) decode as the plain params do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import h3jax
from h3jax import fusion, generation
from h3jax.kernels import cpu_matmul, decode_attention, native
from h3jax.model import ensemble, llama, moe_dispatch, panels
from h3jax.rules import path_str
from h3jax.train import lora as train_lora
from numerics import assert_close
from tiny_hf import make_model, save_model

pytestmark = pytest.mark.skipif(not cpu_matmul.available(), reason="no C++ compiler: the kernel cannot be built")


def _leaf_paths(tree):
  return {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _load(variant, tmp_path, **kw):
  return h3jax.load_pretrained(save_model(make_model(variant, std=0.3, eos_token_id=None, **kw), tmp_path / variant))


def _moe(tmp_path):
  cfg, params = _load("llama_mha_untied", tmp_path)
  experts = [jax.tree.map(lambda a, s=s: a * (1 + 0.1 * s), params) for s in range(3)]  # distinct FFNs
  mcfg, mparams = fusion.fuse_params(cfg, params, [cfg] * 3, experts, top_k=2, router_std=1.0)
  return h3jax.load_pretrained(h3jax.save_pretrained(mparams, mcfg, tmp_path / "moe"))


def _with_lora(tmp_path):
  cfg, params = _load("llama_gqa_tied_llama3", tmp_path)
  params = train_lora.add_lora(params, ["layers/attn/*", "layers/mlp/down_proj"], rank=4, key=jax.random.key(0))
  params = jax.tree_util.tree_map_with_path(  # lora_b starts at zero: give the LoRA path something to add
      lambda p, a: 0.05 * jax.random.normal(jax.random.key(1), a.shape) if path_str(p).endswith("lora_b") else a,
      params)
  return train_lora.lora_model_config(cfg, rank=4, alpha=8, dropout=0.1), params


def _plain(monkeypatch, params, cfg):
  with monkeypatch.context() as m:
    m.setenv(native.ENABLE_ENV, "0")
    return llama.unstack_layers(params, cfg)


def test_every_layer_kernel_and_the_head_are_packed_but_not_the_router(monkeypatch, tmp_path):
  cfg, params = _moe(tmp_path)
  packed = llama.unstack_layers(params, cfg)
  paths = _leaf_paths(packed)
  assert "layers/0/moe/experts/2/down_proj/kernel_panels" in paths and "lm_head/kernel_panels" in paths
  assert "layers/1/attn/v_proj/kernel_panels" in paths and "layers/1/moe/router/kernel" in paths
  assert not {p for p in paths if p.endswith("/kernel") and "router" not in p}
  plain = _leaf_paths(_plain(monkeypatch, params, cfg))
  assert not {p for p in plain if "panels" in p}
  q = packed["layers"][1]["attn"]["q_proj"]["kernel_panels"]
  np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack_panels(q)),
                                np.asarray(params["layers"]["attn"]["q_proj"]["kernel"][1]))
  assert llama.unstack_layers(packed, cfg) is packed  # idempotent
  unstacked = _plain(monkeypatch, params, cfg)  # a caller's own unstacked params are packed, never emptied
  again = llama.unstack_layers(unstacked, cfg)
  assert "kernel" in unstacked["layers"][0]["attn"]["q_proj"]
  assert "kernel_panels" in again["layers"][0]["attn"]["q_proj"]


def test_a_head_that_cannot_be_packed_is_left_and_nothing_is_packed_twice(monkeypatch, tmp_path):
  """Vocabulary 100 is no multiple of 8: the head stays a kernel, the layers are packed once, and unstacking
  the packed params again (generation does at every call) returns them as they are, decoding as plain."""
  cfg, params = _load("llama_mha_untied", tmp_path, vocab_size=100)
  packed = llama.unstack_layers(params, cfg)
  assert "kernel" in packed["lm_head"] and "kernel_panels" in packed["layers"][0]["mlp"]["up_proj"]
  assert llama.unstack_layers(packed, cfg) is packed
  rs = np.random.RandomState(1)
  ids, toks = rs.randint(3, 100, (2, 7)).astype(np.int32), rs.randint(3, 100, (2, 3)).astype(np.int32)
  mask = np.ones_like(ids)
  assert_close(_decode_logits(packed, cfg, ids, mask, toks),
               _decode_logits(_plain(monkeypatch, params, cfg), cfg, ids, mask, toks), rtol=1e-5, atol_rel=1e-5)


def test_tied_head_is_the_embedding_transposed(tmp_path):
  cfg, params = _load("qwen2_bias", tmp_path)
  assert cfg.tie_word_embeddings
  head = llama.unstack_layers(params, cfg)["lm_head"]["kernel_panels"]
  np.testing.assert_array_equal(np.asarray(cpu_matmul.unpack_panels(head)), np.asarray(params["embed"]["embedding"]).T)


def test_not_packed_off_one_cpu_float32(tmp_path):
  cfg, params = _load("llama_mha_untied", tmp_path)
  assert panels.should_pack(params, cfg)
  assert not panels.should_pack(params, cfg.replace(dtype="bfloat16"))
  mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])
  spread = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert not panels.should_pack(spread, cfg)  # replicated over 2 devices: XLA partitions the dots
  members = ensemble.stack_members([params, params])
  assert not panels.should_pack(members, cfg.replace(ensemble_size=2))


def _decode_logits(params, cfg, ids, mask, toks):
  """Logits of a prefill of the prompt and then one token per step, as generation runs them."""
  step = jax.jit(llama.forward_cached, static_argnames=("cfg",))
  seq = jnp.asarray(np.concatenate([ids, toks], axis=1))
  key_mask = jnp.asarray(np.concatenate([mask, np.ones_like(toks)], axis=1), bool)
  pos = llama.positions_from_mask(key_mask)
  (B, S), P = seq.shape, ids.shape[1]
  logits, cache = step(params, seq[:, :P], pos[:, :P], llama.init_cache(cfg, B, S), 0, key_mask, cfg=cfg)
  out = [logits]
  for t in range(P, S):
    logits, cache = step(params, seq[:, t:t + 1], pos[:, t:t + 1], cache, t, key_mask, cfg=cfg)
    out.append(logits)
  return np.asarray(jnp.concatenate(out, axis=1))


# (test_generation's transformers oracles decode every tiny variant through the kernel as well)
@pytest.mark.parametrize("model", ["qwen2_bias", "moe", "lora"])
def test_packed_decoding_equals_plain(model, monkeypatch, tmp_path):
  """Prefill (XLA over the panels: B*P > MAX_ROWS) and decode steps (the kernel) give the plain params'
  logits on left-padded rows, and generation their one-token answers."""
  cfg, params = {"moe": _moe, "lora": _with_lora}.get(model, lambda p: _load(model, p))(tmp_path)
  rs = np.random.RandomState(0)
  ids = rs.randint(3, 128, (3, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  ids[0, :5], mask[0, :5] = 0, 0
  toks = rs.randint(3, 128, (3, 6)).astype(np.int32)
  packed, plain = llama.unstack_layers(params, cfg), _plain(monkeypatch, params, cfg)
  assert "kernel_panels" in packed["lm_head"]
  got, want = _decode_logits(packed, cfg, ids, mask, toks), _decode_logits(plain, cfg, ids, mask, toks)
  real = np.concatenate([mask, np.ones_like(toks)], axis=1).astype(bool)[:, ids.shape[1] - 1:]
  assert_close(got[:, ids.shape[1] - 1:][real], want[:, ids.shape[1] - 1:][real], rtol=1e-5, atol_rel=1e-5)
  a, la = generation.generate_tokens(packed, cfg, ids, mask, max_new_tokens=1)  # a one-token answer
  with monkeypatch.context() as m:
    m.setenv(native.ENABLE_ENV, "0")
    b, lb = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=1)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)


@pytest.mark.parametrize("model", ["qwen2_bias", "lora", "moe"])
def test_a_decode_step_makes_four_kernel_calls_and_one_attention_call_per_layer(model, tmp_path):
  """q / k / v in one call and gate / up in one (they share their input), o and down alone, then the head:
  with biases, with LoRA pairs beside the packed kernels, and in each sparse MoE expert (every tile's
  switch holds a gate / up call and a down call per expert)."""
  cfg, params = {"lora": _with_lora, "moe": _moe}.get(model, lambda p: _load(model, p))(tmp_path)
  packed = llama.unstack_layers(params, cfg)
  B, S = 2, 16
  ids, pos = jnp.ones((B, 1), jnp.int32), jnp.full((B, 1), 3, jnp.int32)
  step = jax.jit(llama.forward_cached, static_argnames=("cfg",))
  text = step.lower(packed, ids, pos, llama.init_cache(cfg, B, S), 3, jnp.ones((B, S), bool), cfg=cfg).as_text()
  ffn_calls = 2
  if cfg.num_experts:
    assert cfg.moe_dispatch == "sparse"
    ffn_calls *= moe_dispatch.sparse_tiles(B, cfg.num_experts_per_tok, cfg.num_experts)[1] * cfg.num_experts
  assert text.count(f"@{cpu_matmul.TARGET}(") == (2 + ffn_calls) * cfg.num_layers + 1
  assert text.count(f"@{decode_attention.TARGET}(") == cfg.num_layers  # attention reads the cache in place
