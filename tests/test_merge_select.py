"""Radix-select k-th largest magnitude == the sort-based TIES trim (h3jax.merging.blocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h3jax.merging import blocks, select


@pytest.mark.parametrize("shape,kind", [((64, 48), "normal"), ((1000,), "ties"), ((7, 3, 5), "heavy"),
                                        ((1,), "normal"), ((33, 17), "zeros_and_subnormals")])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.97])
def test_topk_mask_equals_sort_based(shape, kind, density):
  rng = np.random.default_rng(hash((shape, kind)) % 2**32)
  if kind == "normal":
    x = rng.standard_normal(shape)
  elif kind == "ties":  # many equal magnitudes at the k-th: index tie-breaking must agree
    x = rng.integers(-4, 5, shape).astype(np.float64)
  elif kind == "heavy":
    x = rng.standard_t(1.5, shape) * 1e3
  else:
    x = np.where(rng.random(shape) < 0.5, 0.0, rng.standard_normal(shape) * 1e-41)
  x = jnp.asarray(x, jnp.float32)
  got = jax.jit(select.topk_mask, static_argnums=1)(x, density)
  want = blocks.topk_mask(x, density)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(got.sum()) == max(1, int(density * x.size))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=200), st.data())
def test_kth_largest_is_exact(values, data):
  x = np.asarray(values, np.float32)
  k = data.draw(st.integers(1, x.size))
  got = float(select.kth_largest_abs(jnp.asarray(x), k))
  assert got == float(np.sort(np.abs(x))[::-1][k - 1])
