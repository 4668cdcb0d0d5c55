"""Logit parity of h3jax.model.llama against transformers (torch fp32) and model invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import h3jax
from h3jax.merging.tree import fold_lora
from h3jax.model import llama, lora as lora_lib, params as params_lib
from tiny_hf import VARIANTS, make_model, save_model
from numerics import assert_close, assert_tree_close


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
  model = make_model(request.param)
  path = save_model(model, tmp_path_factory.mktemp(request.param))
  cfg, params = h3jax.load_pretrained(path)
  return request.param, model, cfg, params


def _torch_logits(model, ids, mask=None):
  rot = model.model.rotary_emb
  if getattr(rot, "rope_type", "") == "dynamic":
    # transformers' dynamic NTK keeps the longest length seen in module state; h3jax is
    # stateless (depends on this batch only), so reset HF to a fresh model's state.
    rot.inv_freq, rot.max_seq_len_cached = rot.original_inv_freq.clone(), rot.original_max_seq_len
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.as_tensor(mask)}
    return model(torch.as_tensor(ids), **kw).logits.numpy()


def test_logits_match_transformers(tiny):
  name, model, cfg, params = tiny
  ids = np.random.RandomState(0).randint(0, 128, (2, 40))  # 40 > 16: llama3/dynamic scaling active
  ours = np.asarray(llama.forward_jit(params, jnp.asarray(ids), cfg))
  assert_close(ours, _torch_logits(model, ids), rtol=1e-4, atol_rel=1e-5, err_msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(tiny, side):
  name, model, cfg, params = tiny
  ids = np.random.RandomState(1).randint(3, 128, (3, 24))
  mask = np.ones_like(ids)
  pads = [5, 0, 11]
  for row, n in enumerate(pads):
    if n:
      sl = slice(0, n) if side == "left" else slice(24 - n, 24)
      mask[row, sl], ids[row, sl] = 0, 0
  ref = _torch_logits(model, ids, mask)
  ours = np.asarray(llama.forward_jit(params, jnp.asarray(ids), cfg, jnp.asarray(mask)))
  real = mask.astype(bool)  # logits at padding positions are meaningless on both sides
  assert_close(ours[real], ref[real], rtol=1e-4, atol_rel=1e-5, err_msg=name)


def test_scan_remat_and_unrolled_agree(tiny):
  _, _, cfg, params = tiny
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 12)))
  base = llama.forward(params, ids, cfg)
  for variant in (cfg.replace(scan_layers=False), cfg.replace(remat="full"), cfg.replace(remat="dots")):
    assert_close(llama.forward(params, ids, variant), base, rtol=1e-5, atol_rel=1e-5)


def test_remat_policies_give_the_same_gradients_and_dots_saves_fewer_activations():
  """The training default remat ("dots", h3jax/train/defaults.py) recomputes norms, RoPE, attention and the LoRA
  dropout masks in the backward: the gradients of a LoRA step with dropout equal those of saving every
  activation, and the compiled step holds fewer bytes of them."""
  from h3jax.train import lora as train_lora
  cfg = h3jax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  params = train_lora.add_lora(params_lib.init_params(cfg, jax.random.PRNGKey(0)), train_lora.FFN_TARGETS, 4,
                               jax.random.PRNGKey(1))
  params = jax.tree_util.tree_map_with_path(  # lora_b starts at zero: give every LoRA factor a gradient
      lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, params)
  cfg = train_lora.lora_model_config(cfg, 4, 8.0, 0.2)
  ids = jnp.asarray(np.random.RandomState(4).randint(0, 64, (2, 24)))

  def step(remat):  # compiled once: run and inspected
    c = cfg.replace(remat=remat)
    loss = lambda p: jnp.mean(llama.forward(p, ids, c, rng=jax.random.PRNGKey(2)) ** 2)
    return jax.jit(jax.value_and_grad(loss)).lower(params).compile()

  none, dots = step("none"), step("dots")
  (l0, g0), (l1, g1) = none(params), dots(params)
  assert_close(l1, l0, rtol=1e-6, atol_rel=1e-6)
  assert_tree_close(g1, g0, rtol=1e-5, atol_rel=1e-5)
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in (("none", none), ("dots", dots))}
  assert temp["dots"] < temp["none"], temp


def test_bfloat16_compute_close_to_float32(tiny):
  _, _, cfg, params = tiny
  ids = jnp.asarray(np.random.RandomState(3).randint(0, 128, (2, 16)))
  ref = llama.forward(params, ids, cfg)
  bf = llama.forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), ids, cfg.replace(dtype="bfloat16"))
  assert bf.dtype == jnp.float32  # logits always float32
  # bf16 has ~3 significant digits; the argmax should mostly survive.
  agree = np.mean(np.argmax(bf, -1) == np.argmax(ref, -1))
  assert agree > 0.9 and float(jnp.abs(bf - ref).max()) < 0.25 * float(jnp.abs(ref).max())


def test_causality_by_gradient():
  cfg = h3jax.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  params = params_lib.init_params(cfg, jax.random.PRNGKey(0))
  x_BTD = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 32))
  cos, sin = llama.layers.rope_cos_sin(jnp.arange(8)[None], cfg)
  mask = jnp.tril(jnp.ones((8, 8), bool))[None]

  def out_at(x, t):
    y, _, _ = llama._run_layers(params["layers"], x, cos, sin, mask, jnp.ones((1, 8), bool), cfg)
    return y[0, t].sum()

  for t in (0, 3, 7):
    g = jax.grad(out_at)(x_BTD, t)
    assert float(jnp.abs(g[0, t + 1:]).max(initial=0.0)) == 0.0
    assert float(jnp.abs(g[0, :t + 1]).min()) > 0.0


def test_lora_leaves_add_scaled_delta():
  cfg = h3jax.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=8, lora_scale=0.5)
  params = params_lib.init_params(cfg, jax.random.PRNGKey(0))
  ids = jnp.arange(10)[None] % 32
  ref = llama.forward(params, ids, cfg)
  k = jax.random.split(jax.random.PRNGKey(1), 2)
  a = 0.3 * jax.random.normal(k[0], (2, 16, 4))
  b = 0.3 * jax.random.normal(k[1], (2, 4, 24))
  with_lora = jax.tree.map(lambda x: x, params)
  with_lora["layers"]["mlp"]["up_proj"].update(lora_a=a, lora_b=jnp.zeros_like(b))
  assert_close(llama.forward(with_lora, ids, cfg), ref, rtol=1e-6, atol_rel=1e-6)  # B = 0: no change
  with_lora["layers"]["mlp"]["up_proj"]["lora_b"] = b
  merged = jax.tree.map(lambda x: x, params)
  merged["layers"]["mlp"]["up_proj"]["kernel"] = params["layers"]["mlp"]["up_proj"]["kernel"] + 0.5 * a @ b
  assert_close(llama.forward(with_lora, ids, cfg), llama.forward(merged, ids, cfg), rtol=1e-5, atol_rel=1e-5)
  folded = lora_lib.merge_lora(with_lora, cfg.lora_scale)  # the one fold (export, fusion, merging)
  assert "lora_a" not in folded["layers"]["mlp"]["up_proj"] and "lora_b" not in folded["layers"]["mlp"]["up_proj"]
  assert_close(llama.forward(folded, ids, cfg), llama.forward(with_lora, ids, cfg), rtol=1e-5, atol_rel=1e-5)
  assert folded["layers"]["mlp"]["down_proj"]["kernel"] is params["layers"]["mlp"]["down_proj"]["kernel"]
  again = fold_lora(with_lora, cfg.lora_scale)
  assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(folded)))


def test_batch_sharded_on_explicit_mesh_matches_single_device(tmp_path):
  # One variant suffices: batch sharding does not depend on the architecture.
  cfg, params = h3jax.load_pretrained(save_model(make_model("llama_gqa_tied_llama3"), tmp_path))
  ids = np.random.RandomState(4).randint(0, 128, (4, 12))
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
  ids_s = jax.device_put(jnp.asarray(ids), NS(mesh, P("data")))
  params_s = jax.device_put(params, NS(mesh, P()))

  def loss(p, x):
    return jnp.mean(llama.forward(p, x, cfg) ** 2)

  ref_l, ref_g = jax.value_and_grad(loss)(params, jnp.asarray(ids))
  l, g = jax.jit(jax.value_and_grad(loss))(params_s, ids_s)
  np.testing.assert_allclose(l, ref_l, rtol=1e-5)
  assert_tree_close(g, ref_g, rtol=1e-4, atol_rel=1e-5)


def test_cached_decoding_across_kv_buckets_equals_full_forward():
  """Greedy decoding (unstacked layers, in-place cache, attention over 128-slot buckets, chunks
  that cross a bucket edge) picks the same tokens as argmax of the uncached forward."""
  from h3jax import generation
  cfg = h3jax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  params = params_lib.init_params(cfg, jax.random.PRNGKey(3))
  P, N = 120, 20  # slots 120..139 cross the first KV bucket edge (128)
  prompt = np.random.RandomState(0).randint(0, 64, (2, P)).astype(np.int32)
  mask = np.ones_like(prompt)
  mask[1, :5] = 0  # a left-padded row
  toks, _ = generation.generate_tokens(params, cfg, prompt, mask, max_new_tokens=N, chunk=3)
  assert isinstance(llama.unstack_layers(params)["layers"], tuple)
  # One causal forward over prompt + generated tokens: position P - 1 + t sees exactly the prefix
  # the t-th token was decoded from, so its argmax must be that token.
  seq = jnp.asarray(np.concatenate([prompt, toks[:, :N]], 1))
  m = jnp.asarray(np.concatenate([mask, np.ones((2, N), np.int32)], 1))
  logits = jax.jit(llama.forward, static_argnums=2)(params, seq, cfg, attention_mask_BT=m,
                                                     positions_BT=llama.positions_from_mask(m))
  np.testing.assert_array_equal(toks[:, :N], np.asarray(jnp.argmax(logits[:, P - 1:P - 1 + N], -1)))


def test_collected_intermediates_match_transformers_hooks(tiny):
  """forward(collect=...) returns each layer's inputs as transformers' modules receive them."""
  name, model, cfg, params = tiny
  ids = np.random.RandomState(4).randint(3, 128, (2, 20))
  mask = np.ones_like(ids)
  mask[1, :6] = 0  # a left-padded row
  seen = {k: [] for k in llama.COLLECTABLE}
  hooks = []
  for layer in model.model.layers:
    for key, mod in (("layer_in", layer), ("attn_in", layer.self_attn), ("o_in", layer.self_attn.o_proj),
                     ("mlp_in", layer.mlp), ("down_in", layer.mlp.down_proj)):
      def hook(_, args, kwargs, key=key):
        x = args[0] if args else kwargs["hidden_states"]
        seen[key].append(x.detach().numpy())
      hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
  try:
    _torch_logits(model, ids, mask)
  finally:
    for h in hooks:
      h.remove()
  logits, aux = llama.forward(params, jnp.asarray(ids), cfg, attention_mask_BT=jnp.asarray(mask),
                              return_aux=True, collect=llama.COLLECTABLE)
  real = mask.astype(bool)
  for key in llama.COLLECTABLE:
    ours, ref = np.asarray(aux[key]), np.stack(seen[key])
    assert ours.shape == ref.shape == (cfg.num_layers, 2, 20, ref.shape[-1]), key
    assert_close(ours[:, real], ref[:, real], rtol=1e-4, atol_rel=1e-5, err_msg=f"{name} {key}")
  plain = llama.forward(params, jnp.asarray(ids), cfg, attention_mask_BT=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))  # collecting changes nothing
  with pytest.raises(ValueError, match="cannot collect"):
    llama.forward(params, jnp.asarray(ids), cfg, collect=("q_in",))
