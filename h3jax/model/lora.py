"""LoRA leaves of a params tree: the delta they add and folding them into the kernels.

A linear dict `{kernel [..., in, out], lora_a [..., in, r], lora_b [..., r, out]}`
computes x @ kernel + scale * x @ lora_a @ lora_b (`layers.linear`, with
`cfg.lora_scale = alpha / r`). Leading axes (layers L, experts E) are kept.
`merge_lora` is the one fold used by HF export, fusion, the merge engine
(`h3jax.merging.tree.fold_lora`) and the study; fresh factors are added by
`h3jax.train.lora.add_lora`.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from h3jax.model.params import flatten_dict, unflatten_dict


def lora_delta(leaf: dict, scale: float):
  """Effective weight change scale * A @ B of one linear dict ([..., in, out]), in float32."""
  return scale * jnp.einsum("...ir,...ro->...io", leaf["lora_a"].astype(jnp.float32),
                            leaf["lora_b"].astype(jnp.float32))


def merge_lora(params, scale: float):
  """Copy of params with every `lora_a`/`lora_b` pair folded into the `kernel` beside it:
  W + scale * A @ B in float32, cast back to W's dtype; the factors are dropped. Any nesting of
  mappings works; other leaves (and non-mapping inputs) are returned as they are."""
  if isinstance(params, Mapping):
    if "kernel" in params and "lora_a" in params and "lora_b" in params:
      out = {k: v for k, v in params.items() if k not in ("lora_a", "lora_b")}
      k = params["kernel"]
      out["kernel"] = (k.astype(jnp.float32) + lora_delta(params, scale)).astype(k.dtype)
      return out
    return {k: merge_lora(v, scale) for k, v in params.items()}
  return params


def strip_lora(params: dict) -> dict:
  """Copy of params without its `lora_a` / `lora_b` leaves (kernels unchanged)."""
  return unflatten_dict({k: v for k, v in flatten_dict(params).items()
                            if k[-1] not in ("lora_a", "lora_b")})
