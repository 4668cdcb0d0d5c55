"""The native decode attention (h3jax/kernels/decode_attention.cc) against a float64 softmax attention and
XLA's path; the decode step uses it and greedy decoding is unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax.config import ModelConfig
from h3jax.kernels import decode_attention as da
from h3jax.model import layers
from numerics import assert_close

pytestmark = pytest.mark.skipif(not da.available(), reason="no C++ compiler: the kernel cannot be built")


def _case(L, B, S, K, R, Dh, n, seed=0, pad=0):
  """Stacked caches [L, B, S, K, Dh], a query per row [B, K, R, Dh] and a mask over the first n slots with the
  first `pad` slots of row 0 masked (a left-padded prompt)."""
  rs = np.random.RandomState(seed)
  k, v = (rs.standard_normal((L, B, S, K, Dh)).astype(np.float32) for _ in range(2))
  q = (2 * rs.standard_normal((B, K, R, Dh))).astype(np.float32)
  mask = np.ones((B, n), bool)
  mask[0, :pad] = False
  return q, k, v, mask


def _reference(q, k, v, mask, layer):
  """float64 softmax attention; masked scores at float32's lowest value, as layers._masked_softmax."""
  n, Dh = mask.shape[1], q.shape[-1]
  kl, vl = k[layer, :, :n].astype(np.float64), v[layer, :, :n].astype(np.float64)  # [B, n, K, Dh]
  s = np.einsum("bkrh,bskh->bkrs", q.astype(np.float64), kl) / np.sqrt(Dh)
  s = np.where(mask[:, None, None], s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bkrs,bskh->bkrh", p, vl).reshape(q.shape[0], -1)


def _kernel(q, k, v, mask, layer):
  fn = jax.jit(lambda q, k, v, m, l: da.attend(q, k, v, m, l, None))
  assert da.TARGET in fn.lower(q, k, v, mask, layer).as_text()
  return np.asarray(fn(q, k, v, mask, layer))


# SmolLM2's heads (K=3, R=3, Dh=64) at 1 and 8 rows, a slot count not a multiple of 8 and one slot, a
# head dim of 128 and of 8, one query head per kv head (MHA), padding, the last and the first layer.
@pytest.mark.parametrize("L,B,S,K,R,Dh,n,pad,layer", [
    (30, 1, 96, 3, 3, 64, 96, 0, 29), (30, 8, 96, 3, 3, 64, 40, 5, 7), (2, 3, 37, 2, 4, 128, 37, 3, 1),
    (1, 2, 8, 1, 1, 8, 1, 0, 0), (3, 5, 20, 4, 1, 16, 19, 18, 2)])
def test_kernel_matches_float64_attention(L, B, S, K, R, Dh, n, pad, layer):
  q, k, v, mask = _case(L, B, S, K, R, Dh, n, pad=pad)
  out, ref = _kernel(q, k, v, mask, layer), _reference(q, k, v, mask, layer)
  assert_close(out, ref, rtol=1e-5, atol_rel=1e-5)
  # the slots past n and the other layers are never read: changing them changes nothing
  k2, v2 = k.copy(), v.copy()
  k2[:, :, n:], v2[:, :, n:] = np.nan, np.nan
  others = [l for l in range(L) if l != layer]
  k2[others], v2[others] = np.nan, np.nan
  np.testing.assert_array_equal(_kernel(q, k2, v2, mask, layer), out)


def test_a_row_with_every_key_masked_attends_uniformly():
  q, k, v, mask = _case(2, 2, 16, 1, 2, 16, 12)
  mask[1] = False
  out = _kernel(q, k, v, mask, 1)
  np.testing.assert_allclose(out[1].reshape(2, 16), np.broadcast_to(v[1, 1, :12, 0].mean(0), (2, 16)),
                             rtol=1e-5, atol=1e-6 * np.abs(v).max())


def test_equals_the_xla_path_of_the_decode_step():
  """layers.attention's XLA einsums (the path of prefill, other platforms and unpacked params) and the kernel
  give the same attention over a dynamic layer index."""
  L, B, S, K, R, Dh, n = 4, 3, 24, 3, 3, 64, 17
  q, k, v, mask = _case(L, B, S, K, R, Dh, n, pad=4)
  cfg = ModelConfig(vocab_size=8, hidden_size=K * R * Dh, intermediate_size=8, num_layers=L, num_heads=K * R,
                    num_kv_heads=K, head_dim=Dh)

  def xla(q, k, v, m, l):
    kl = jax.lax.dynamic_slice(k, (l, 0, 0, 0, 0), (1, B, n, K, Dh))[0]
    vl = jax.lax.dynamic_slice(v, (l, 0, 0, 0, 0), (1, B, n, K, Dh))[0]
    return layers.attend_in_place(q[:, None], kl, vl, m[:, None], cfg).reshape(B, -1)

  for layer in range(L):
    kern = jax.jit(lambda q, k, v, m, l: da.attend(q, k, v, m, l, xla))(q, k, v, mask, jnp.int32(layer))
    assert_close(kern, jax.jit(xla)(q, k, v, mask, jnp.int32(layer)), rtol=1e-5, atol_rel=1e-5)


def test_disabled_kernel_runs_the_callers_path(monkeypatch):
  q, k, v, mask = _case(2, 2, 16, 1, 2, 16, 12)
  monkeypatch.setattr(da, "available", lambda: False)
  called = []
  fallback = lambda *a: called.append(1) or jnp.zeros((2, 32), jnp.float32)
  assert da.attend(q, k, v, mask, 0, fallback).shape == (2, 32) and called
  assert not da.fits(jnp.asarray(q[..., :8]), jnp.asarray(k))
