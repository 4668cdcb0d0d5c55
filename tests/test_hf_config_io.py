"""Strict HF config translation."""

import json

import pytest
import transformers

from h3jax.hf import config_io
from tiny_hf import VARIANTS, make_model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_through_hf_dict(variant):
  hf = make_model(variant).config.to_dict()
  cfg = config_io.hf_config_to_model_config(hf)
  again = config_io.hf_config_to_model_config(json.loads(json.dumps(config_io.model_config_to_hf(cfg))))
  assert again == cfg


def test_old_style_rope_theta_and_rope_scaling_accepted():
  new = make_model("llama_gqa_tied_llama3").config.to_dict()
  old = {k: v for k, v in new.items() if k != "rope_parameters"}
  rp = dict(new["rope_parameters"])
  old["rope_theta"] = rp.pop("rope_theta")
  old["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rp.items()}
  assert config_io.hf_config_to_model_config(old) == config_io.hf_config_to_model_config(new)


def _base():
  return make_model("llama_gqa_linear").config.to_dict()


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "unsupported rope_type 'yarn'"),
    ({"some_new_feature": True}, r"config attribute\(s\) \['some_new_feature'\] are not implemented"),
    ({"hidden_act": "gelu"}, "only hidden_act='silu'"),
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"mlp_bias": True}, "MLP biases are not implemented"),
    ({"sliding_window": 4, "architectures": ["MistralForCausalLM"], "model_type": "mistral"},
     "sliding-window attention is not implemented"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "only full_attention"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 3}},
     r"unsupported rope parameter\(s\) \['beta_fast'\]"),
])
def test_unimplemented_attributes_are_errors(change, message):
  hf = {**_base(), **change}
  with pytest.raises(config_io.UnsupportedConfigError, match=message):
    config_io.hf_config_to_model_config(hf)


def test_bookkeeping_keys_are_accepted_and_semantic_unknowns_still_fail(tmp_path):
  """A GGUF-converted config.json carries `_model_name_or_path`; other writers add private `_...` keys,
  versions, dtypes, auto_map and generation defaults. None changes the forward pass."""
  base = _base()
  want = config_io.hf_config_to_model_config(base)
  extra = {"_model_name_or_path": "x/y.gguf", "_attn_implementation": "sdpa", "transformers_version": "4.46.0",
           "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", "dtype": "bfloat16",
           "use_bfloat16": False, "auto_map": {}, "max_length": 20, "do_sample": False, "name_or_path": "y"}
  assert config_io.hf_config_to_model_config({**base, **extra}) == want
  for semantic in ({"attn_logit_softcapping": 50.0}, {"residual_multiplier": 0.5}, {"hidden_activation": "x"}):
    with pytest.raises(config_io.UnsupportedConfigError, match=f"{next(iter(semantic))}.* are not implemented"):
      config_io.hf_config_to_model_config({**base, **extra, **semantic})
  # The real path: a folder whose config.json has the GGUF converter's key loads with identical logits.
  import h3jax
  model = make_model("llama_gqa_linear")
  model.save_pretrained(tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**hf, "_model_name_or_path": "m.gguf"}))
  cfg, _ = h3jax.load_pretrained(str(tmp_path))
  assert cfg == want


def test_llama_attention_bias_includes_o_proj():
  cfg = config_io.hf_config_to_model_config(make_model("llama_attn_bias").config.to_dict())
  assert cfg.attention_bias and cfg.attention_out_bias
  q = config_io.hf_config_to_model_config(make_model("qwen2_bias").config.to_dict())
  assert q.attention_bias and not q.attention_out_bias  # Qwen2: q/k/v only
  with pytest.raises(config_io.UnsupportedConfigError, match="q/k/v and o_proj together"):
    config_io.model_config_to_hf(cfg.replace(attention_out_bias=False))
  with pytest.raises(config_io.UnsupportedConfigError, match="Qwen2ForCausalLM has no o_proj bias"):
    config_io.model_config_to_hf(q.replace(attention_out_bias=True))


def test_inactive_sliding_window_is_fine():
  hf = make_model("mistral").config.to_dict()
  hf["sliding_window"] = hf["max_position_embeddings"]
  assert config_io.hf_config_to_model_config(hf).architecture == "mistral"
  q = make_model("qwen2_bias").config.to_dict()
  q.update(sliding_window=4, use_sliding_window=False)
  assert config_io.hf_config_to_model_config(q).attention_bias


def test_mixtral_config():
  hf = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                  num_experts_per_tok=2).to_dict()
  cfg = config_io.hf_config_to_model_config(hf)
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.is_moe) == (3, 2, True)
  assert config_io.model_config_to_hf(cfg)["architectures"] == ["MixtralForCausalLM"]
