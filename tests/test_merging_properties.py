"""Merge methods: hypothesis properties (identical models, lambda = 0, density 1, SLERP endpoints,
SVD methods linear in alpha)."""

import numpy as np
from hypothesis import given, settings, strategies as st

from h3jax import merging as M
from h3jax.merging import blocks
from numerics import assert_close

PROPS = settings(max_examples=4, deadline=None)


def _arrays(seed, n=3, shape=(6, 5), scale=0.1):
  rng = np.random.default_rng(seed)
  b = rng.normal(size=shape).astype(np.float32)
  return b, [b + scale * rng.normal(size=shape).astype(np.float32) for _ in range(n)]


IDENTITY = {
    "linear": {}, "task_arithmetic": {"normalize": True}, "ties": {}, "dare_linear": {"normalize": True},
    "breadcrumbs": {"normalize": True, "gamma": 0.0}, "della": {"density": 1.0},
    "model_stock": {}, "consensus_ta": {"normalize": True}, "consensus_ties": {},
}


@PROPS
@given(seed=st.integers(0, 10_000), n=st.integers(2, 3), w=st.sampled_from([1.0, 0.3]))
def test_merging_identical_models_returns_that_model(seed, n, w):
  base, (m,) = _arrays(seed, n=1)
  for name, kw in IDENTITY.items():
    kw = dict(kw)
    if name != "model_stock":
      kw["weight"] = w
    out = M.get_method(name)(base, [m] * n, **kw)
    np.testing.assert_allclose(out, m, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(M.fisher(None, [m] * n, fishers=[np.abs(m) + 1] * n), m, rtol=1e-5)
  parts = M.emr(base, [m] * n)
  for out in parts:
    np.testing.assert_allclose(out, m, rtol=1e-5, atol=1e-6)


LAMBDA0 = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
           "dare_ties": {"density": 0.5}, "breadcrumbs": {"density": 0.5},
           "breadcrumbs_ties": {"density": 0.5}, "della": {"density": 0.5},
           "della_linear": {"density": 0.5}, "consensus_ta": {}, "consensus_ties": {"density": 0.5}}


@PROPS
@given(seed=st.integers(0, 10_000))
def test_lambda_zero_returns_the_base(seed):
  base, ms = _arrays(seed)
  for name, kw in LAMBDA0.items():
    np.testing.assert_array_equal(M.get_method(name)(base, ms, lambda_=0.0, **kw), base, err_msg=name)
  np.testing.assert_array_equal(M.ties(base, ms, density=0.5, mode="fusion_bench", lambda_=0.0), base)
  np.testing.assert_allclose(M.tsv_m(base, ms, alpha=0.0), base)
  np.testing.assert_allclose(M.iso_c(base, ms, scaling_factor=0.0), base)
  np.testing.assert_allclose(M.iso_cts(base, ms, scaling_factor=0.0), base)


@PROPS
@given(seed=st.integers(0, 10_000), w=st.sampled_from([(1.0, 1.0, 1.0), (0.5, 1.0, 2.0)]))
def test_density_one_reduces_to_task_arithmetic(seed, w):
  base, ms = _arrays(seed)
  ta = M.task_arithmetic(base, ms, weight=w)
  np.testing.assert_allclose(M.dare_linear(base, ms, weight=w, density=1.0), ta, rtol=1e-6)
  np.testing.assert_allclose(M.della_linear(base, ms, weight=w, density=1.0), ta, rtol=1e-6)
  np.testing.assert_allclose(M.breadcrumbs(base, ms, weight=w, density=1.0), ta, rtol=1e-6)
  # TIES-family with density 1 = no trimming: sign election + disjoint merge; with one
  # model, or with sign-consistent deltas, that is task arithmetic.
  no_trim = blocks.combine(base, np.stack(ms) - base, w, consensus="mergekit")
  for f in (M.dare_ties, M.breadcrumbs_ties):
    np.testing.assert_allclose(f(base, ms, weight=w, density=1.0), no_trim, rtol=1e-6)
  np.testing.assert_allclose(M.ties(base, ms, weight=w, density=1.0, normalize=False), no_trim, rtol=1e-6)
  np.testing.assert_allclose(M.ties(base, ms[:1], density=1.0), ms[0], rtol=1e-6)
  pos = [base + np.abs(m - base) for m in ms]
  np.testing.assert_allclose(M.ties(base, pos, weight=w, density=1.0, normalize=False),
                             M.task_arithmetic(base, pos, weight=w), rtol=1e-6)
  np.testing.assert_allclose(M.ties(base, pos, density=1.0, mode="fusion_bench"),
                             M.task_arithmetic(base, pos), rtol=1e-6)


@PROPS
@given(seed=st.integers(0, 10_000))
def test_slerp_endpoints(seed):
  base, (m,) = _arrays(seed, n=1, scale=1.0)
  assert_close(M.slerp(base, [m], t=0.0), base, rtol=1e-6, atol_rel=1e-6)
  assert_close(M.slerp(base, [m], t=1.0), m, rtol=1e-5, atol_rel=1e-5)


@PROPS
@given(seed=st.integers(0, 10_000), a=st.sampled_from([0.5, 2.0]))
def test_svd_methods_linear_in_alpha(seed, a):
  base, ms = _arrays(seed)
  d1 = np.asarray(M.tsv_m(base, ms)) - base
  assert_close(np.asarray(M.tsv_m(base, ms, alpha=a)) - base, a * d1, rtol=1e-4, atol_rel=1e-5)
  assert_close(np.asarray(M.tsv_m(base, ms, alpha=[a] * 3)) - base, a * d1, rtol=1e-4, atol_rel=1e-5)
