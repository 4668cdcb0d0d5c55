"""Model configuration: one frozen, hashable record used as a static jit argument.

Dimension letters used in shape suffixes across h3jax:
  B batch, T query length, S key/value length, D hidden, F FFN, V vocab,
  L layers, H query heads, K kv heads, R = H // K query heads per kv head,
  Dh head dim, E experts, C expert capacity.

The HF <-> ModelConfig translation (strict attribute checking) lives in
`h3jax.hf.config_io`; this module knows nothing about HF.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ARCHITECTURES = ("llama", "mistral", "qwen2")
MOE_DISPATCH = ("dense", "capacity", "ragged", "expert_parallel", "sparse")
REMAT = ("none", "full", "dots")  # what the layer scan saves for the backward (model/llama.py)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name) -> jnp.dtype:
  """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype, with a clear error."""
  if not isinstance(name, str):
    return jnp.dtype(name)
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return jnp.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Split-half rotary embedding; `rope_type` names follow transformers."""
  rope_type: str = "default"
  theta: float = 10000.0
  factor: float = 1.0  # linear / dynamic / llama3
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  original_max_position_embeddings: Optional[int] = None  # llama3 / dynamic

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"unsupported rope_type {self.rope_type!r}; h3jax implements {ROPE_TYPES}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder (Llama, Mistral, Qwen2), optionally with MoE FFNs."""
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int  # K
  head_dim: int  # Dh
  architecture: str = "llama"
  rms_norm_eps: float = 1e-5
  rope: RopeConfig = RopeConfig()
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v biases (Qwen2; Llama attention_bias=True)
  attention_out_bias: bool = False  # o_proj bias (Llama attention_bias=True; Qwen2 has none)
  bos_token_id: Optional[int] = None
  eos_token_id: Tuple[int, ...] = ()
  pad_token_id: Optional[int] = None
  # Numerics: params are stored in their own dtype; matmuls run in `dtype`;
  # norms, softmax, rope angles, router and loss always run in float32.
  dtype: str = "float32"
  # Layer execution.
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots
  # Mixture of experts (num_experts == 0 means a dense FFN).
  num_experts: int = 0
  num_experts_per_tok: int = 2
  moe_dispatch: str = "dense"
  capacity_factor: float = 0.0  # <= 0: dropless capacity (C = tokens * k)
  expert_names: Tuple[str, ...] = ()
  # LoRA: any linear leaf dict holding `lora_a` [.., in, r] / `lora_b` [.., r, out]
  # next to its `kernel` adds lora_scale * (dropout(x) @ lora_a) @ lora_b.
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  # Output ensemble (h3jax.model.ensemble): params stacked on a leading member axis of this size, logits
  # combined by mean probability ("prob") or mean log-probability ("logprob"); 0 = one model.
  ensemble_size: int = 0
  ensemble_mode: str = "prob"

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"unsupported architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    resolve_dtype(self.dtype)
    if self.ensemble_size and (self.ensemble_size < 2 or self.ensemble_mode not in ("prob", "logprob")):
      raise ValueError(f"ensemble_size must be 0 or >= 2 and ensemble_mode prob|logprob, got "
                       f"{self.ensemble_size}, {self.ensemble_mode!r}")
    if self.remat not in REMAT:
      raise ValueError(f"remat must be {'|'.join(REMAT)}, got {self.remat!r}")
    if self.num_experts:
      if self.num_experts < 2:
        raise ValueError(f"num_experts must be >= 2 (or 0 for dense), got {self.num_experts}")
      if not 1 <= self.num_experts_per_tok <= self.num_experts:
        raise ValueError(f"top_k (num_experts_per_tok={self.num_experts_per_tok}) must be in "
                         f"[1, num_experts={self.num_experts}]")
      if self.moe_dispatch not in MOE_DISPATCH:
        raise ValueError(f"unknown moe_dispatch {self.moe_dispatch!r}; expected one of {MOE_DISPATCH}")

  @property
  def q_per_kv(self) -> int:  # R
    return self.num_heads // self.num_kv_heads

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def compute_dtype(self):
    return resolve_dtype(self.dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
