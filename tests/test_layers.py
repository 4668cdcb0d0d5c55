"""h3jax.model.layers: the LoRA dropout mask (a counter hash seeded from the key, not threefry), the LoRA term's
own backward, attention against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax.model import layers
from numerics import assert_close


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


def _lora_grads_f64(x, a, b, g, scale):
  """Gradients of sum(g * scale * x @ a @ b) w.r.t. x, a, b in float64 numpy."""
  x, a, b, g = (np.asarray(t, np.float64) for t in (x, a, b, g))
  dh = scale * g @ b.T
  return dh @ a.T, x.T @ dh, scale * (x @ a).T @ g


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["random", "b_zero", "a_zero", "one_token", "rank_one"])
def test_lora_term_backward_equals_autodiff_and_float64(case, dtype):
  """lora_term's own backward against jax's autodiff of the same formula and a float64 reference, on the
  degenerate factors of real LoRA: lora_b = 0 (every adapter at initialisation: lora_a's gradient is exactly
  0, lora_b's is not), lora_a = 0, a single token, rank 1."""
  rs = np.random.RandomState(0)
  N, I, O, R, scale = (1 if case == "one_token" else 37), 24, 20, (1 if case == "rank_one" else 4), 0.75
  x, a, b, g = (rs.randn(*s).astype(np.float32) for s in ((N, I), (I, R), (R, O), (N, O)))
  if case == "b_zero":
    b[:] = 0
  if case == "a_zero":
    a[:] = 0
  x, a, b, g = (jnp.asarray(t, dtype) for t in (x, a, b, g))
  loss = lambda f: (lambda x, a, b: jnp.sum((f(x, a, b) * g).astype(jnp.float32)))
  mine = jax.jit(jax.grad(loss(lambda x, a, b: layers.lora_term(x, a, b, scale)), argnums=(0, 1, 2)))(x, a, b)
  auto = jax.jit(jax.grad(loss(lambda x, a, b: (scale * (x @ a)) @ b), argnums=(0, 1, 2)))(x, a, b)
  ref = _lora_grads_f64(x, a, b, g, scale)
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2
  for name, m, au, r in zip(("x", "lora_a", "lora_b"), mine, auto, ref):
    assert m.dtype == dtype and m.shape == r.shape, name
    if not r.any():  # b = 0: the x and lora_a gradients are exactly 0; a = 0: the x and lora_b ones
      assert not np.asarray(m, np.float32).any() and not np.asarray(au, np.float32).any(), name
      continue
    assert_close(m, r, rtol=rtol, atol_rel=rtol, err_msg=f"{name} vs float64")
    assert_close(m, au, rtol=rtol, atol_rel=rtol, err_msg=f"{name} vs autodiff")
  y = layers.lora_term(x, a, b, scale)
  y_ref = scale * np.asarray(x, np.float64) @ np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  assert_close(y, y_ref, rtol=rtol, atol_rel=rtol)  # a zero factor: y_ref = 0 and y must be exactly 0


@pytest.mark.parametrize("shared_x", [False, True])
def test_lora_term_batched_over_experts(shared_x):
  """The MoE's expert axis: x [E, M, I] (capacity slots) or one x [M, I] for every expert (dense dispatch),
  factors [E, I, r] / [E, r, O]; gradients against autodiff and a float64 reference per expert (a shared x's
  gradient sums over the experts). Expert 1's lora_b is 0, as at initialisation. (Inside the expert-parallel
  shard_map: tests/test_moe.py's expert-parallel tests.)"""
  rs = np.random.RandomState(1)
  E, M, I, O, R, scale = 3, 11, 16, 12, 4, 0.5
  x = rs.randn(*((M, I) if shared_x else (E, M, I))).astype(np.float32)
  a, b, g = rs.randn(E, I, R).astype(np.float32), rs.randn(E, R, O).astype(np.float32), rs.randn(E, M, O)
  b[1] = 0
  x, a, b, g = (jnp.asarray(t, jnp.float32) for t in (x, a, b, g))
  loss = lambda f: (lambda x, a, b: jnp.sum(f(x, a, b) * g))
  mine = jax.grad(loss(lambda x, a, b: layers.lora_term(x, a, b, scale)), argnums=(0, 1, 2))(x, a, b)
  auto = jax.grad(loss(lambda x, a, b: (scale * (x @ a)) @ b), argnums=(0, 1, 2))(x, a, b)
  per = [_lora_grads_f64(x if shared_x else x[e], a[e], b[e], g[e], scale) for e in range(E)]
  ref = (sum(p[0] for p in per) if shared_x else np.stack([p[0] for p in per]),
         np.stack([p[1] for p in per]), np.stack([p[2] for p in per]))
  for name, m, au, r in zip(("x", "lora_a", "lora_b"), mine, auto, ref):
    assert m.shape == r.shape, name
    assert_close(m, r, rtol=1e-5, atol_rel=1e-5, err_msg=f"{name} vs float64")
    assert_close(m, au, rtol=1e-5, atol_rel=1e-5, err_msg=f"{name} vs autodiff")
  assert not np.asarray(mine[1][1]).any()  # lora_b = 0: that expert's lora_a gradient is exactly 0


def test_lora_a_gradient_is_formed_rank_by_input():
  """The reason for lora_term's backward: the compiled gradient forms lora_a's gradient as an [r, in] product
  (dh^T x) and transposes that, never the [in, r] product XLA:CPU runs several times slower."""
  N, I, O, R, E = 64, 48, 40, 4, 3  # also batched over experts, as the MoE's capacity dispatch runs it
  for shapes, out, slow in ((((N, I), (I, R), (R, O), (N, O)), f"f32[{R},{I}]", f"f32[{I},{R}]"),
                            (((E, N, I), (E, I, R), (E, R, O), (E, N, O)), f"f32[{E},{R},{I}]", f"f32[{E},{I},{R}]")):
    args = [jnp.ones(s, jnp.float32) for s in shapes]
    f = jax.jit(jax.grad(lambda x, a, b, g: jnp.sum(layers.lora_term(x, a, b, 0.5) * g), argnums=1))
    dots = [l.split("=")[1].split("dot(")[0] for l in f.lower(*args).compile().as_text().splitlines() if " dot(" in l]
    assert any(out in d for d in dots) and not any(slow in d for d in dots), dots


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
