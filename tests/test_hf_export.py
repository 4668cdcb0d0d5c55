"""save_pretrained: transformers reloads what h3jax writes, bit for bit and logit for logit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import h3jax
from h3jax.hf import st_io
from h3jax.model import llama, params as params_lib
from tiny_hf import make_model, save_model
from numerics import assert_close


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["llama_mha_untied", "llama_gqa_tied_llama3", "qwen2_bias", "mistral",
                                     "llama_attn_bias"])
def test_round_trip_is_bit_identical(variant, tmp_path):
  model = make_model(variant)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path / "src"))
  out = h3jax.save_pretrained(params, cfg, tmp_path / "out")
  src_files = sorted(f for f in os.listdir(tmp_path / "src") if f.endswith(".safetensors"))
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == src_files
  with st_io.SafetensorsReader(tmp_path / "src") as a, st_io.SafetensorsReader(out) as b:
    assert sorted(a.keys()) == sorted(b.keys())  # tied lm_head not written
    for k in a.keys():
      np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ref, got = _state(model), _state(back)
  assert sorted(ref) == sorted(got)
  for k in ref:
    np.testing.assert_array_equal(ref[k], got[k], err_msg=k)


def test_sharded_save_reloads_with_same_logits(tmp_path):
  model = make_model("llama_gqa_linear")
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path / "src"))
  out = h3jax.save_pretrained(params, cfg, tmp_path / "out", max_shard_size="30KB")
  index = json.loads((out / st_io.INDEX_NAME).read_text())
  assert len(set(index["weight_map"].values())) > 2
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    np.testing.assert_array_equal(back(ids).logits.numpy(), model(ids).logits.numpy())


def test_lora_is_merged_into_kernels(tmp_path):
  model = make_model("llama_mha_untied")
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path / "src"))
  cfg = cfg.replace(lora_scale=0.5)
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  mlp = params["layers"]["mlp"]["up_proj"]
  L, D, F = mlp["kernel"].shape
  mlp["lora_a"] = 0.3 * jax.random.normal(k[0], (L, D, 4))
  mlp["lora_b"] = 0.3 * jax.random.normal(k[1], (L, 4, F))
  ids = np.random.RandomState(0).randint(0, 128, (2, 12))
  ours = np.asarray(llama.forward(params, jnp.asarray(ids), cfg))
  out = h3jax.save_pretrained(params, cfg, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = back(torch.as_tensor(ids)).logits.numpy()
  assert_close(ours, ref, rtol=1e-4, atol_rel=1e-5)
  with torch.no_grad():  # and the LoRA made a difference
    assert np.abs(model(torch.as_tensor(ids)).logits.numpy() - ref).max() > 1e-2


def _tiny_moe_cfg(**kw):
  return h3jax.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, architecture="mistral", num_experts=3,
                           num_experts_per_tok=2, moe_dispatch="dense", bos_token_id=1, eos_token_id=(2,), **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_moe_exports_as_mixtral_with_matching_logits(tmp_path, tied):
  cfg = _tiny_moe_cfg(tie_word_embeddings=tied)
  params = params_lib.init_params(cfg, jax.random.PRNGKey(1), std=0.2)
  out = h3jax.save_pretrained(params, cfg, tmp_path / "mixtral")
  assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(hf).__name__ == "MixtralForCausalLM"
  ids = np.random.RandomState(0).randint(0, 96, (2, 16))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  ours = np.asarray(llama.forward(params, jnp.asarray(ids), cfg))
  assert_close(ours, ref, rtol=1e-4, atol_rel=1e-5)
  cfg2, params2 = h3jax.load_pretrained(out)  # and back, bit-identical
  assert cfg2.num_experts == 3 and cfg2.tie_word_embeddings == tied
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2))


def test_loads_transformers_mixtral(tmp_path):
  config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)
  torch.manual_seed(0)
  hf = transformers.MixtralForCausalLM(config).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
  hf.save_pretrained(tmp_path / "m")
  cfg, params = h3jax.load_pretrained(tmp_path / "m")
  ids = np.random.RandomState(1).randint(0, 96, (2, 12))
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids)).logits.numpy()
  ours = np.asarray(llama.forward(params, jnp.asarray(ids), cfg.replace(moe_dispatch="dense")))
  assert_close(ours, ref, rtol=1e-4, atol_rel=1e-5)


def test_refuses_to_overwrite_and_writes_nothing_on_error(tmp_path):
  model = make_model("llama_mha_untied")
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path / "src"))
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
    h3jax.save_pretrained(params, cfg, tmp_path / "busy")
  assert os.listdir(tmp_path / "busy") == ["keep.txt"]
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["mlp"]["up_proj"]["kernel"] = bad["layers"]["mlp"]["up_proj"]["kernel"][:, :, :10]
  with pytest.raises(ValueError, match="layers/mlp/up_proj/kernel has shape"):
    h3jax.save_pretrained(bad, cfg, tmp_path / "new")
  with pytest.raises(FileNotFoundError, match="tokenizer source folder not found"):
    h3jax.save_pretrained(params, cfg, tmp_path / "new", tokenizer_source=tmp_path / "nope")
  assert sorted(os.listdir(tmp_path)) == ["busy", "src"]  # no partial output, no temp dirs left
  # overwrite replaces a previous output, never someone's other files (h3jax.io_atomic)
  with pytest.raises(ValueError, match=r"refusing to replace .*keep\.txt"):
    h3jax.save_pretrained(params, cfg, tmp_path / "busy", overwrite=True)
  os.remove(tmp_path / "busy" / "keep.txt")
  h3jax.save_pretrained(params, cfg, tmp_path / "busy")  # an empty folder needs no overwrite
  (tmp_path / "busy" / "stale.safetensors").write_bytes(b"")
  h3jax.save_pretrained(params, cfg, tmp_path / "busy", overwrite=True)
  assert "stale.safetensors" not in os.listdir(tmp_path / "busy")
  assert sorted(os.listdir(tmp_path)) == ["busy", "src"]
