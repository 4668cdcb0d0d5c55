"""The one HF <-> h3jax key table per architecture family, used by load and export.

Each row maps an h3jax params path to an HF tensor-name template. `{l}` is the
layer index (the leaf's leading L axis), `{e}` the expert index (its E axis, after
L). `T` rows are nn.Linear weights: HF stores [out, in], h3jax kernels are
[in, out]. `only` restricts a row to configs with that property. Export walks
the rows one way, load the other; nothing else knows HF names.

Mixtral is written in the classic `block_sparse_moe.experts.{e}.w{1,2,3}` layout
(what transformers 5 `save_pretrained` writes and every Mixtral on the hub uses);
load also accepts transformers-5's in-memory fused layout (`mlp.experts.gate_up_proj`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Iterator, List, Optional, Tuple

from h3jax.config import ModelConfig

Path = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Row:
  path: Path
  hf: str  # template with {l} / {e}
  transpose: bool = False
  only: Optional[str] = None  # "untied" | "bias" | "out_bias" | "dense" | "moe"


_L = "model.layers.{l}."
TABLE: List[Row] = [
    Row(("embed", "embedding"), "model.embed_tokens.weight"),
    Row(("final_norm", "scale"), "model.norm.weight"),
    Row(("lm_head", "kernel"), "lm_head.weight", True, "untied"),
    Row(("layers", "attn_norm", "scale"), _L + "input_layernorm.weight"),
    Row(("layers", "mlp_norm", "scale"), _L + "post_attention_layernorm.weight"),
    *[Row(("layers", "attn", n, "kernel"), _L + f"self_attn.{n}.weight", True)
      for n in ("q_proj", "k_proj", "v_proj", "o_proj")],
    *[Row(("layers", "attn", n, "bias"), _L + f"self_attn.{n}.bias", False, "bias")
      for n in ("q_proj", "k_proj", "v_proj")],
    Row(("layers", "attn", "o_proj", "bias"), _L + "self_attn.o_proj.bias", False, "out_bias"),
    *[Row(("layers", "mlp", n, "kernel"), _L + f"mlp.{n}.weight", True, "dense")
      for n in ("gate_proj", "up_proj", "down_proj")],
    Row(("layers", "moe", "router", "kernel"), _L + "block_sparse_moe.gate.weight", True, "moe"),
    *[Row(("layers", "moe", "experts", n, "kernel"), _L + f"block_sparse_moe.experts.{{e}}.{w}.weight", True, "moe")
      for n, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))],
]

# Names some checkpoints carry that hold no parameters (old rotary caches).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _applies(row: Row, cfg: ModelConfig) -> bool:
  return {None: True, "untied": not cfg.tie_word_embeddings, "bias": cfg.attention_bias,
          "out_bias": cfg.attention_out_bias,
          "dense": not cfg.is_moe, "moe": cfg.is_moe}[row.only]


def rows(cfg: ModelConfig) -> List[Row]:
  return [r for r in TABLE if _applies(r, cfg)]


def expand(row: Row, cfg: ModelConfig) -> Iterator[Tuple[tuple, str]]:
  """(index into the stacked leaf, HF name) for every HF tensor of a row."""
  layers = range(cfg.num_layers) if "{l}" in row.hf else [None]
  experts = range(cfg.num_experts) if "{e}" in row.hf else [None]
  for l in layers:
    for e in experts:
      idx = tuple(i for i in (l, e) if i is not None)
      yield idx, row.hf.format(l=l, e=e)


def hf_names(cfg: ModelConfig) -> Dict[str, Tuple[Row, tuple]]:
  """Every HF tensor name a checkpoint for `cfg` holds -> (row, leaf index)."""
  return {name: (row, idx) for row in rows(cfg) for idx, name in expand(row, cfg)}


# transformers-5 fused Mixtral layout (load only): name -> (row path, slice of HF dim 1 as (start, stop)).
def fused_moe_sources(cfg: ModelConfig, l: int) -> Dict[Path, Tuple[str, Optional[Tuple[int, int]]]]:
  F = cfg.intermediate_size
  p = f"model.layers.{l}.mlp."
  return {
      ("layers", "moe", "router", "kernel"): (p + "gate.weight", None),
      ("layers", "moe", "experts", "gate_proj", "kernel"): (p + "experts.gate_up_proj", (0, F)),
      ("layers", "moe", "experts", "up_proj", "kernel"): (p + "experts.gate_up_proj", (F, 2 * F)),
      ("layers", "moe", "experts", "down_proj", "kernel"): (p + "experts.down_proj", None),
  }
