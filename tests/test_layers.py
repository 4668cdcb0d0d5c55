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
