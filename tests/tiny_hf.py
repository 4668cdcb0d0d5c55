"""Tiny random transformers models for parity tests (torch fp32, no hub)."""

from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, model class, extra config kwargs)
VARIANTS = {
    "llama_mha_untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                         dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_gqa_tied_llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                              dict(num_key_value_heads=2, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16})),
    "llama_gqa_linear": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                         dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                                      "factor": 2.0})),
    "llama_gqa_dynamic": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          dict(num_key_value_heads=2, max_position_embeddings=16,
                               rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    # Llama's attention_bias=True: biases on q/k/v *and* o_proj (unlike Qwen2).
    "llama_attn_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                        dict(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    "qwen2_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_model(variant: str, seed: int = 0, std: float = 0.1, **overrides):
  """A random tiny model whose weights are far from init (so bugs show in the logits)."""
  config_cls, model_cls, extra = VARIANTS[variant]
  torch.manual_seed(seed)
  config = config_cls(**{**TINY, **extra, **overrides})
  model = model_cls(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0, std)
      else:
        p.uniform_(0.5, 1.5) if p.shape[0] == config.hidden_size else p.normal_(0, std)
  return model


def save_model(model, path) -> str:
  model.save_pretrained(path)
  return str(path)
