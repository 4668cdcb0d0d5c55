"""RESM (reconstruction): defaults equal TSV-M, each knob's unit behaviour, reported stats."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h3jax import merging as M
from h3jax.merging import svd as svd_lib
from numerics import assert_close, assert_tree_close

# `h3jax.merging.resm` is the function; the module is reached through importlib.
resm_lib = importlib.import_module("h3jax.merging.resm")


def _arrays(seed, n=3, shape=(12, 9)):
  rng = np.random.default_rng(seed)
  b = rng.normal(size=shape).astype(np.float32)
  return b, [b + 0.1 * rng.standard_t(3, size=shape).astype(np.float32) for _ in range(n)]


def _tree(seed, sparse_layer=True):
  """Stacked [2, 12, 9] leaf whose layer 1 deltas are 90% zeros, plus a 1-D leaf."""
  rng = np.random.default_rng(seed)
  base = {"layers": {"w": rng.normal(size=(2, 12, 9)).astype(np.float32)},
          "norm": np.ones(9, np.float32)}
  models = []
  for _ in range(3):
    d = rng.normal(size=(2, 12, 9)).astype(np.float32) * 0.1
    if sparse_layer:
      d[1] *= rng.random((12, 9)) < 0.1
    models.append({"layers": {"w": base["layers"]["w"] + d},
                   "norm": base["norm"] + 0.1 * rng.normal(size=9).astype(np.float32)})
  return base, models


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 3))
def test_default_knobs_equal_tsv_m_exactly(seed, n):
  b, ms = _arrays(seed, n)
  np.testing.assert_array_equal(M.resm(b, ms), M.tsv_m(b, ms))
  np.testing.assert_array_equal(M.resm(b, ms, alpha=0.7), M.tsv_m(b, ms, alpha=0.7))


def test_defaults_equal_tsv_m_on_trees_and_disabled_knobs_too():
  base, models = _tree(0)
  ref = M.tsv_m(base, models)
  jax.tree.map(np.testing.assert_array_equal, M.resm(base, models), ref)
  # Knobs switched on but inert: kappa = inf, lambda_r = 0 -> same as TSV-M (masked path).
  out = M.resm(base, models, outlier_mode="sv", kappa=float("inf"))
  assert_tree_close(out, ref, rtol=1e-5, atol_rel=1e-5)
  out = M.resm(base, models, rank_mode="sparsity", lambda_r=0.0)
  assert_tree_close(out, ref, rtol=1e-5, atol_rel=1e-5)


def test_uniform_rank_mode_is_tsvm():
  base, models = _tree(1)
  for outlier_mode in ("none", "sv"):
    jax.tree.map(np.testing.assert_array_equal,
                 M.resm(base, models, rank_mode="uniform", outlier_mode=outlier_mode),
                 M.resm(base, models, rank_mode="tsvm", outlier_mode=outlier_mode))


def test_single_task_full_rank_returns_the_task_vector():
  b, (m,) = _arrays(1, n=1)
  assert_close(M.resm(b, [m], outlier_mode="sv", kappa=1e9), m, rtol=1e-5, atol_rel=1e-5)


def test_sparsity_aware_ranks_match_truncated_tsv():
  base, models = _tree(2)
  out, stats = M.resm(base, models, rank_mode="sparsity", lambda_r=0.4, return_stats=True)
  ranks = stats["layers/w"]["rank"]
  sp = stats["layers/w"]["sparsity"]
  assert ranks.shape == (2,) and sp[1] > sp[0]
  # r = 9, T = 3: dense layer (z = 0) keeps floor(9/3) = 3; the sparsest (z = 1) round(9*.6/3) = 2.
  assert ranks.tolist() == [3, 2]
  for layer, k in enumerate(ranks.tolist()):
    d = jnp.stack([m["layers"]["w"][layer] - base["layers"]["w"][layer] for m in models])
    u, s, v = svd_lib.tsv_factors(d, k)  # plain truncation, no masking
    np.testing.assert_allclose(out["layers"]["w"][layer] - base["layers"]["w"][layer],
                               svd_lib.tsv_combine(u, s, v), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["norm"], base["norm"] + np.mean([m["norm"] - base["norm"] for m in models], 0),
                             rtol=1e-6)
  assert resm_lib.sparsity_range(base, models, 1e-3) == pytest.approx((float(sp[0]), float(sp[1])))


def test_singular_value_outlier_weights_hand():
  s = jnp.array([10.0, 1.0, 1.1, 0.9, 1.0, 7.0])
  keep = jnp.array([True, True, True, True, True, False])
  w = resm_lib.sv_outlier_weights(s, keep, kappa=3.0, gamma=1.0)
  z = 9.0 / (1.4826 * 0.1)  # median 1.0, MAD 0.1 over the kept values
  np.testing.assert_allclose(w, [3.0 / z, 1, 1, 1, 1, 1], rtol=1e-4)
  b, ms = _arrays(3)
  out, stats = M.resm(b, ms, outlier_mode="sv", kappa=1.0, return_stats=True)
  st_ = stats[""]
  assert 0 < float(st_["outlier_fraction"]) < 1 and float(st_["mean_weight"]) < 1
  assert not np.allclose(out, M.tsv_m(b, ms))


def test_sv_outliers_on_lora_task_vectors_ignore_the_rounding_triples():
  """Rank-2 task vectors stored in float32 (theta = fl(theta_0 + B A)): 2 real singular values per task
  and rounding noise (~1e-7 relative) in the other 14 of the 16 TSV-M keeps. The outlier statistics
  must come from the real ones; with the noise in the median every real value was an outlier and the
  merge collapsed onto the base."""
  rng = np.random.default_rng(7)
  base = rng.normal(size=(48, 40)).astype(np.float32)
  models = [base + (0.02 * rng.normal(size=(48, 2)) @ rng.normal(size=(2, 40))).astype(np.float32)
            for _ in range(3)]
  tsv = M.tsv_m(base, models)
  # inert: no real value is an outlier among 6 of similar size at kappa = 3 -> TSV-M
  out = M.resm(base, models, outlier_mode="sv")
  assert_close(out - base, tsv - base, rtol=1e-4, atol_rel=1e-5)
  old = M.resm(base, models, outlier_mode="sv", sv_rtol=0.0)  # the first version's statistics
  assert np.linalg.norm(old - base) < 1e-2 * np.linalg.norm(tsv - base)
  # a real outlier among the real values is still down-weighted
  big = list(models)
  big[0] = base + 40 * (models[0] - base)
  w, stats = M.resm(base, big, outlier_mode="sv", kappa=1.0, return_stats=True)
  assert 0 < float(stats[""]["outlier_fraction"]) < 1
  assert np.linalg.norm(w - base) < np.linalg.norm(M.tsv_m(base, big) - base)
  with pytest.raises(ValueError, match="sv_rtol must be in"):
    M.resm(base, models, outlier_mode="sv", sv_rtol=1.0)


def test_parameter_outlier_shrinking_hand():
  tau = jnp.array([1.0] * 9 + [20.0])
  out, frac = resm_lib.shrink_outliers(tau, M=5.0, beta=0.5)  # thr = 5 * 2.9 = 14.5
  np.testing.assert_allclose(out, [1.0] * 9 + [14.5 + 0.5 * 5.5], rtol=1e-6)
  assert float(frac) == pytest.approx(0.1)
  b, ms = _arrays(4, n=1, shape=(6, 6))
  # beta = 1 leaves tau unchanged: single task, full rank -> the model itself.
  assert_close(M.resm(b, ms, outlier_mode="param", beta=1.0), ms[0], rtol=1e-5, atol_rel=1e-5)


def test_rank_cap_on_lora_deltas_equals_factored_path():
  rng = np.random.default_rng(5)
  base = rng.normal(size=(10, 8)).astype(np.float32)
  bs = [rng.normal(size=(10, 2)).astype(np.float32) for _ in range(2)]
  as_ = [rng.normal(size=(2, 8)).astype(np.float32) for _ in range(2)]
  models = [base + b @ a for b, a in zip(bs, as_)]
  ref = svd_lib.tsv_lora_delta(bs, as_)
  for f in (M.tsv_m, M.resm):
    out = f(base, models, rank_cap="numerical", rank_rtol=1e-4)
    assert_close(np.asarray(out) - base, ref, rtol=1e-3, atol_rel=1e-4)


def test_bad_knobs():
  b, ms = _arrays(0)
  with pytest.raises(ValueError, match="rank_mode must be one of \\['sparsity', 'tsvm', 'uniform'\\]"):
    M.resm(b, ms, rank_mode="nope", outlier_mode="sv")
  with pytest.raises(ValueError, match="outlier_mode must be one of \\['none', 'sv', 'param'\\]"):
    M.resm(b, ms, outlier_mode="nope")
  with pytest.raises(ValueError, match="rank_cap must be None or 'numerical'"):
    M.resm(b, ms, rank_cap="full")
  # The modes are checked before any tensor is read (a planner's dry run on empty trees sees them).
  with pytest.raises(ValueError, match="rank_mode must be one of"):
    M.check_hparams("resm", dict(rank_mode="nope"))
  with pytest.raises(ValueError, match="unknown hyper-parameter"):
    M.check_hparams("tsv_m", dict(alfa=1.0))
  M.check_hparams("resm", dict(rank_mode="uniform", outlier_mode="sv"))
  with pytest.raises(ValueError, match="lambda_r must be in \\[0, 1\\)"):
    M.resm(b, ms, lambda_r=1.0)
  with pytest.raises(ValueError, match="resm is base-relative"):
    M.resm(None, ms)
