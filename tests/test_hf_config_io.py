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
