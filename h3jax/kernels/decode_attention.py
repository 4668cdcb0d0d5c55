"""One decode step's attention read in place from the stacked KV cache (`decode_attention.cc`), on CPU.

XLA:CPU runs decode attention (one query per row against a layer's cache slice) as loop fusions on one
thread. SmolLM2's 30 layers at 96 cache slots (`benchmarks/decode_kernel.py`, its attention rows; Intel, 2
cores): XLA 19.8 ms at 8 rows and 1.5 ms at 1 row, this kernel 3.1 / 0.7 ms, reading the caches once 1.3 /
0.17 ms. The kernel shares the (row, kv head) pairs among the calling thread and XLA's intra-op pool and reads
each key and value once, from the stacked [L, B, S, K, Dh] cache as it is (no slice is copied out).

It is part of the library `native.py` builds; without it, with `H3JAX_CPU_KERNELS=0`, or off CPU, `attend`
runs the caller's XLA path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from h3jax.kernels import native

TARGET = "h3jax_decode_attention_f32"
SYMBOL = "H3jaxDecodeAttentionF32"
MAX_GROUP, MAX_HEAD_DIM, LANES = 16, 256, 8  # decode_attention.cc's kMaxGroup, kMaxDh, kLanes


def available() -> bool:
  """Whether the kernel is built and registered (and not disabled by H3JAX_CPU_KERNELS=0)."""
  return native.ffi_target(TARGET, SYMBOL)


def fits(q_BKRH, k_LBSKH) -> bool:
  """float32 query and cache, head dim a multiple of 8 up to 256, at most 16 query heads per kv head."""
  _, _, R, Dh = q_BKRH.shape
  return (q_BKRH.dtype == jnp.float32 and k_LBSKH.dtype == jnp.float32 and Dh % LANES == 0
          and Dh <= MAX_HEAD_DIM and R <= MAX_GROUP and available())


def attend(q_BKRH, k_LBSKH, v_LBSKH, mask_BS, layer, xla_attend):
  """Softmax attention of one query per row (q [B, K, R, Dh]) over the first n = mask_BS.shape[1] slots of
  layer `layer` of the stacked caches [L, B, S, K, Dh]; mask_BS [B, n] bool. Returns [B, K * R * Dh]: the
  kernel on CPU, else `xla_attend(q_BKRH, k_LBSKH, v_LBSKH, mask_BS, layer)` (the caller's XLA path, which must
  return the same)."""
  B, K, R, Dh = q_BKRH.shape
  layer = jnp.asarray(layer, jnp.int32)
  if not available():
    return xla_attend(q_BKRH, k_LBSKH, v_LBSKH, mask_BS, layer)

  def kernel(q, k, v, m, l):
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((B, K * R * Dh), jnp.float32), vmap_method="sequential")
    return out(q, k, v, m, l)

  return jax.lax.platform_dependent(q_BKRH, k_LBSKH, v_LBSKH, mask_BS.astype(bool), layer,
                                    cpu=kernel, default=xla_attend)
