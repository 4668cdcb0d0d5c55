"""HF config.json <-> ModelConfig, strictly.

Every attribute of an HF config is either mapped, checked to hold a value whose
behaviour h3jax implements, or known to not affect the forward pass
(bookkeeping such as `_model_name_or_path` or `transformers_version`, generation
defaults, training-only knobs). Anything else is an error naming the attribute: silently ignoring e.g. a sliding window
or a yarn rope would give a model that loads and computes the wrong thing.
Accepts transformers-v5 `rope_parameters` and the older `rope_theta` /
`rope_scaling` pair.
"""

from __future__ import annotations

from typing import Any, Dict

from h3jax.config import ModelConfig, RopeConfig, resolve_dtype

# HF architecture class -> (model_type, h3jax architecture, MoE)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "llama", False),
    "MistralForCausalLM": ("mistral", "mistral", False),
    "Qwen2ForCausalLM": ("qwen2", "qwen2", False),
    "MixtralForCausalLM": ("mixtral", "mistral", True),
}
_MODEL_TYPES = {v[0]: k for k, v in ARCHITECTURES.items()}

# Bookkeeping: where the file came from and how it was stored. Keys with a leading underscore
# (`_name_or_path`, `_model_name_or_path` from GGUF conversion, `_attn_implementation...`) are
# transformers-private and always bookkeeping too (`_is_bookkeeping`).
_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_bfloat16",
    "auto_map", "name_or_path", "finetuning_task", "tokenizer_class", "torchscript", "tf_legacy_loss",
    "quantization_config_removed", "task_specific_params", "prefix", "id2label", "label2id",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states", "use_return_dict",
}
# Generation defaults some writers leave in config.json (generation reads its own settings).
_GENERATION_DEFAULTS = {
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}
# Attributes with no effect on inference (training-only knobs, unused special tokens, caches).
_NO_EFFECT = _BOOKKEEPING | _GENERATION_DEFAULTS | {
    "initializer_range", "use_cache", "is_encoder_decoder", "chunk_size_feed_forward",
    "unk_token_id", "output_router_logits", "router_aux_loss_coef", "max_window_layers",
    "sep_token_id", "decoder_start_token_id",
}


def _is_bookkeeping(key: str) -> bool:
  return key.startswith("_") or key in _NO_EFFECT


# attribute -> predicate on its value, with the reason shown when it fails.
_REQUIRED_VALUES = {
    "hidden_act": (lambda v: v == "silu", "only hidden_act='silu' (SwiGLU) is implemented"),
    "mlp_bias": (lambda v: not v, "MLP biases are not implemented"),
    "pretraining_tp": (lambda v: v in (None, 1), "pretraining_tp > 1 is not implemented"),
    "attention_dropout": (lambda v: not v, "attention dropout is not implemented"),
    "router_jitter_noise": (lambda v: not v, "router jitter noise is not implemented"),
    "use_sliding_window": (lambda v: not v, "sliding-window attention is not implemented"),
    "quantization_config": (lambda v: v is None, "quantized checkpoints are not supported; "
                            "de-quantize first (see `python -m h3jax.prepare`)"),
}
_MAPPED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta", "rope_scaling",
    "rope_parameters", "sliding_window", "layer_types", "num_local_experts", "num_experts_per_tok",
}
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "dynamic": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}


class UnsupportedConfigError(ValueError):
  """The HF config asks for behaviour h3jax does not implement."""


def _fail(msg):
  raise UnsupportedConfigError(msg)


def _rope(hf: Dict[str, Any]) -> RopeConfig:
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in _ROPE_KEYS:
    _fail(f"unsupported rope_type {rope_type!r}; h3jax implements {sorted(_ROPE_KEYS)}")
  extra = set(params) - _ROPE_KEYS[rope_type]
  if params.get("partial_rotary_factor", 1.0) == 1.0:
    extra.discard("partial_rotary_factor")
  if extra:
    _fail(f"unsupported rope parameter(s) {sorted(extra)} for rope_type {rope_type!r}")
  omax = params.get("original_max_position_embeddings")
  if rope_type == "dynamic" and omax not in (None, hf.get("max_position_embeddings")):
    _fail("dynamic rope with original_max_position_embeddings != max_position_embeddings is not implemented")
  if rope_type == "llama3" and omax is None:
    _fail("llama3 rope needs original_max_position_embeddings")
  return RopeConfig(rope_type=rope_type, theta=float(theta), factor=float(params.get("factor", 1.0)),
                    low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=omax)


def architecture_of(hf: Dict[str, Any]) -> str:
  archs = hf.get("architectures") or []
  if not archs and hf.get("model_type") in _MODEL_TYPES:
    archs = [_MODEL_TYPES[hf["model_type"]]]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    _fail(f"unsupported architecture {archs or hf.get('model_type')!r}; h3jax loads {sorted(ARCHITECTURES)}")
  return archs[0]


def hf_config_to_model_config(hf: Dict[str, Any], dtype: str = "float32") -> ModelConfig:
  """Translate an HF config dict; raises UnsupportedConfigError on anything unimplemented."""
  arch_name = architecture_of(hf)
  _, arch, moe = ARCHITECTURES[arch_name]
  unknown = sorted(k for k in set(hf) - set(_REQUIRED_VALUES) - _MAPPED if not _is_bookkeeping(k))
  if unknown:
    _fail(f"config attribute(s) {unknown} are not implemented by h3jax for {arch_name}")
  for key, (ok, why) in _REQUIRED_VALUES.items():
    if key in hf and not ok(hf[key]):
      _fail(f"config {key}={hf[key]!r}: {why}")
  max_pos = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  if window is not None and window < max_pos and (arch_name != "Qwen2ForCausalLM" or hf.get("use_sliding_window")):
    _fail(f"config sliding_window={window} < max_position_embeddings={max_pos}: sliding-window "
          "attention is not implemented")
  if any(t != "full_attention" for t in hf.get("layer_types") or []):
    _fail(f"config layer_types {sorted(set(hf['layer_types']))}: only full_attention is implemented")
  H, D = int(hf["num_attention_heads"]), int(hf["hidden_size"])
  eos = hf.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
  kw = {}
  if moe:
    # sparse: inference reads only the chosen experts (training stages pick their own dispatch)
    kw = dict(num_experts=int(hf["num_local_experts"]), num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
              moe_dispatch="sparse")
  elif "num_local_experts" in hf or "num_experts_per_tok" in hf:
    _fail(f"{arch_name} config has MoE attributes; use MixtralForCausalLM")
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]), hidden_size=D, intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=H,
      num_kv_heads=int(hf.get("num_key_value_heads") or H), head_dim=int(hf.get("head_dim") or D // H),
      architecture=arch, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope=_rope(hf),
      max_position_embeddings=max_pos, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
      # Llama's attention_bias puts a bias on o_proj too; Qwen2's q/k/v biases have none there.
      attention_out_bias=arch == "llama" and bool(hf.get("attention_bias", False)),
      bos_token_id=hf.get("bos_token_id"), eos_token_id=eos, pad_token_id=hf.get("pad_token_id"),
      dtype=dtype, **kw)


def hf_architecture(cfg: ModelConfig) -> str:
  if cfg.is_moe:
    return "MixtralForCausalLM"
  return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
      cfg.architecture]


def model_config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> Dict[str, Any]:
  """The config.json transformers needs to rebuild `cfg` (v5 `rope_parameters` style)."""
  resolve_dtype(dtype)
  arch_name = hf_architecture(cfg)
  if cfg.is_moe and cfg.attention_bias:
    _fail("MixtralForCausalLM has no attention biases; cannot export an MoE with q/k/v biases")
  if cfg.architecture == "qwen2" and not cfg.attention_bias:
    _fail("Qwen2ForCausalLM always has q/k/v biases; this config has attention_bias=False")
  if cfg.attention_out_bias and (cfg.architecture != "llama" or cfg.is_moe):
    _fail(f"{arch_name} has no o_proj bias; this config has attention_out_bias=True")
  if cfg.architecture == "llama" and not cfg.is_moe and cfg.attention_bias != cfg.attention_out_bias:
    _fail("LlamaForCausalLM's attention_bias puts biases on q/k/v and o_proj together; this config has "
          f"attention_bias={cfg.attention_bias}, attention_out_bias={cfg.attention_out_bias}")
  r = cfg.rope
  rope = {"rope_type": r.rope_type, "rope_theta": r.theta}
  if r.rope_type != "default":
    rope["factor"] = r.factor
  if r.rope_type == "llama3":
    rope.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
  if r.original_max_position_embeddings is not None:
    rope["original_max_position_embeddings"] = r.original_max_position_embeddings
  eos = list(cfg.eos_token_id)
  hf = {
      "architectures": [arch_name], "model_type": ARCHITECTURES[arch_name][0],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings, "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": cfg.pad_token_id,
      "attention_dropout": 0.0, "dtype": dtype,
  }
  if cfg.architecture == "llama" and not cfg.is_moe:
    hf.update(attention_bias=cfg.attention_bias, mlp_bias=False)
  if cfg.architecture == "mistral" or cfg.is_moe:
    hf["sliding_window"] = None
  if cfg.architecture == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None)
  if cfg.is_moe:
    hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
              router_jitter_noise=0.0, output_router_logits=False)
  return hf
