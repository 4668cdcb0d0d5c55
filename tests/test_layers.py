"""h3jax.model.layers: the LoRA dropout mask (a counter hash seeded from the key, not threefry)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax.model import layers


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.25, 0.5])
def test_dropout_keep_rate_and_independence(rate):
  shape = (256, 1536)
  a = np.asarray(layers.dropout_keep(jax.random.key(0), rate, shape))
  b = np.asarray(layers.dropout_keep(jax.random.key(1), rate, shape))
  n, p = a.size, 1.0 - rate
  se = np.sqrt(p * (1 - p) / n)
  assert a.shape == shape and a.dtype == bool
  assert abs(a.mean() - p) < 5 * se and abs(b.mean() - p) < 5 * se
  # two keys' masks agree as often as independent Bernoullis do (p^2 + (1-p)^2), not as shifted copies
  pa = p * p + (1 - p) ** 2
  assert abs((a == b).mean() - pa) < 5 * np.sqrt(pa * (1 - pa) / n)
  # no structure along either axis: row and column keep rates spread like binomials
  for axis in (0, 1):
    m = a.mean(axis)
    want = np.sqrt(p * (1 - p) / a.shape[axis])
    assert 0.8 * want < m.std() < 1.2 * want, (axis, m.std(), want)
  # neighbouring elements are uncorrelated
  x = a.astype(np.float64) - a.mean()
  assert abs((x[:, 1:] * x[:, :-1]).mean()) / x.var() < 0.02


def test_dropout_keep_is_a_pure_function_of_the_key_under_jit():
  k = jax.random.key(7)
  eager = np.asarray(layers.dropout_keep(k, 0.1, (3, 5, 7)))
  jitted = np.asarray(jax.jit(lambda k: layers.dropout_keep(k, 0.1, (3, 5, 7)))(k))
  np.testing.assert_array_equal(eager, jitted)
  assert np.asarray(layers.dropout_keep(k, 0.0, (64, 64))).all()


def test_linear_lora_dropout_scales_kept_inputs():
  """With dropout, the LoRA branch sees x * keep / (1 - rate): equal to the masked input computed by hand."""
  from h3jax.config import ModelConfig
  cfg = ModelConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8, max_position_embeddings=16, lora_dropout=0.25, lora_scale=0.5)
  rs = np.random.RandomState(0)
  p = {"kernel": jnp.asarray(rs.randn(16, 12), jnp.float32), "lora_a": jnp.asarray(rs.randn(16, 4), jnp.float32),
       "lora_b": jnp.asarray(rs.randn(4, 12), jnp.float32)}
  x = jnp.asarray(rs.randn(2, 5, 16), jnp.float32)
  rng = jax.random.key(3)
  keep = np.asarray(layers.dropout_keep(rng, 0.25, x.shape))
  xl = np.where(keep, np.asarray(x) / 0.75, 0.0)
  want = np.asarray(x) @ np.asarray(p["kernel"]) + 0.5 * xl @ np.asarray(p["lora_a"]) @ np.asarray(p["lora_b"])
  got = np.asarray(layers.linear(p, x, cfg, rng))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _attention_reference(q_BTKRH, k_BSKH, v_BSKH, mask_BTS):
  """GQA softmax attention in float64 numpy, masked scores at float32's min as the model sets them (a row
  with every key masked then attends uniformly)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BTKRH, k_BSKH, v_BSKH))
  B, T, K, R, Dh = q.shape
  s = np.einsum("btkrh,bskh->bkrts", q, k) / np.sqrt(Dh)
  s = np.where(np.asarray(mask_BTS)[:, None, None], s, np.finfo(np.float32).min)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bkrts,bskh->btkrh", p, v).reshape(B, T, K * R * Dh)


@pytest.mark.parametrize("attend", ["attend_heads_first", "attend_in_place"])
def test_attention_equals_the_reference_with_padding_and_gqa(attend):
  """Both attention layouts (heads first: training and uncached forwards; in place: decoding) against
  float64 attention: causal, a left-padded row whose first query attends to no key, GQA."""
  from h3jax.config import ModelConfig
  B, T, K, R, Dh = 2, 6, 2, 3, 4
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (B, T, K, R, Dh))
  k = jax.random.normal(ks[1], (B, T, K, Dh))
  v = jax.random.normal(ks[2], (B, T, K, Dh))
  token_mask = jnp.array([[1] * T, [0, 0] + [1] * (T - 2)], bool)
  mask = jnp.tril(jnp.ones((T, T), bool))[None] & token_mask[:, None, :]
  assert not mask[1, 0].any()  # a padding query with nothing to attend to
  cfg = ModelConfig(vocab_size=8, hidden_size=K * R * Dh, intermediate_size=8, num_layers=1, num_heads=K * R,
                    num_kv_heads=K, head_dim=Dh)
  got = jax.jit(getattr(layers, attend), static_argnums=4)(q, k, v, mask, cfg)
  want = _attention_reference(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
