"""Sort-free magnitude top-k (h3jax.merging.select) == a stable sort of |x|, on both paths
(CPU numpy callback and the radix select used elsewhere)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h3jax.merging import select


def sorted_topk_mask(x, k):
  """Reference: the k largest |x| by a stable sort (ties at the k-th kept by flat index)."""
  bits = np.abs(np.asarray(x, np.float32)).view(np.uint32).astype(np.int64).ravel()
  mask = np.zeros(bits.size, bool)
  mask[np.argsort(-bits, kind="stable")[:k]] = True
  return mask.reshape(np.shape(x))


def make(kind, n, rng):
  if kind == "normal":
    return rng.standard_normal(n)
  if kind == "ties":  # many equal magnitudes at the k-th: the index tie-break must agree
    return rng.integers(-4, 5, n).astype(np.float64)
  if kind == "heavy":
    return rng.standard_t(1.5, n) * 1e3
  if kind == "sparse":  # a fine-tune that touched 5% of the entries: the cut falls in the zeros
    return np.where(rng.random(n) < 0.05, rng.standard_normal(n), 0.0)
  if kind == "sorted":  # a layout that defeats naive strided sampling
    return np.sort(rng.standard_normal(n))
  return np.where(rng.random(n) < 0.5, 0.0, rng.standard_normal(n) * 1e-41)  # zeros, subnormals


KINDS = ["normal", "ties", "heavy", "sparse", "sorted", "subnormal"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 1000, 70_001])  # 70_001 > 4 x sample: the bracket path
def test_topk_mask_equals_stable_sort(kind, n):
  rng = np.random.default_rng([n, KINDS.index(kind)])
  x = make(kind, n, rng).astype(np.float32)
  f = jax.jit(select.exact_topk_mask, static_argnums=1)
  for k in sorted({1, max(1, n // 5), n}):
    want = sorted_topk_mask(x, k)
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), k)), want)
  k = max(1, n // 5)  # radix path (one compile per k: one k)
  thr, cut = jax.jit(select._radix_topk_cut, static_argnums=1)(jnp.abs(jnp.asarray(x)), k)
  np.testing.assert_array_equal(np.asarray(select.mask_from_cut(jnp.asarray(x), thr, cut)),
                                sorted_topk_mask(x, k))


def test_topk_mask_density_keeps_mergekit_k():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((33, 17)), jnp.float32)
  for density in (0.001, 0.2, 0.97):
    m = select.topk_mask(x, density)
    assert int(m.sum()) == max(1, int(density * x.size))
    np.testing.assert_array_equal(np.asarray(m), sorted_topk_mask(np.asarray(x), int(m.sum())))


def test_first_true_keeps_the_first_need():
  rng = np.random.default_rng(1)
  f = jax.jit(select.first_true)
  n = 5000  # several 1024-rows, the last one partial
  for p in (0.001, 0.3, 1.0):
    eq = rng.random(n) < p
    for need in sorted({0, 1, int(eq.sum()) // 2, int(eq.sum())}):
      np.testing.assert_array_equal(np.asarray(f(jnp.asarray(eq), need)), eq & (np.cumsum(eq) <= need))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=200), st.data())
def test_kth_largest_is_exact(values, data):
  x = np.asarray(values, np.float32)
  k = data.draw(st.integers(1, x.size))
  want = float(np.sort(np.abs(x))[::-1][k - 1])
  assert float(select.kth_largest_abs(jnp.asarray(x), k)) == want
  assert float(select._radix_kth_largest_abs(jnp.asarray(x), k)) == want
