"""Sort-free / SVD-free fast paths of TSV-M against float64 numpy SVD references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax.merging import blocks
from h3jax.merging import svd as svd_lib
from numerics import assert_close


def tsvm_reference(deltas):
  """FusionBench's TSV-M in float64: full SVDs, top r/T triples, polar by SVD."""
  k = int(min(deltas[0].shape) / len(deltas))
  us, ss, vs = [], [], []
  for d in deltas:
    u, s, vt = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
  polar = lambda a: np.matmul(*np.linalg.svd(a, full_matrices=False)[::2])
  return (polar(np.concatenate(us, 1)) * np.concatenate(ss)) @ polar(np.concatenate(vs, 1)).T


def test_top_singular_matches_svd():
  rng = np.random.default_rng(0)
  for shape in ((200, 96), (96, 200)):
    x = np.where(rng.random(shape) < 0.2, rng.standard_normal(shape), 0.0)
    u, s, v = jax.jit(svd_lib.top_singular, static_argnums=1)(jnp.asarray(x, jnp.float32), 16)
    u_ref, s_ref, vt_ref = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(np.asarray(s), s_ref[:16], rtol=1e-5)
    # singular vectors up to sign: compare the rank-16 reconstructions
    assert_close(np.asarray(u * s) @ np.asarray(v).T, (u_ref[:, :16] * s_ref[:16]) @ vt_ref[:16], rtol=1e-4,
                 atol_rel=2e-5)


def test_tsv_m_fast_path_matches_float64_reference():
  rng = np.random.default_rng(1)
  base = rng.standard_normal((160, 96)).astype(np.float32)
  deltas = [np.where(rng.random(base.shape) < 0.05, rng.standard_normal(base.shape), 0.0)
            for _ in range(3)]  # k = 32, q = 64 < 96: the Gram / Rayleigh-Ritz path
  models = [jnp.asarray(base + d, jnp.float32) for d in deltas]
  got = np.asarray(svd_lib.tsv_m(jnp.asarray(base), models, solver="gram"), np.float64) - base
  want = tsvm_reference([np.asarray(m, np.float64) - base for m in models])
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def _with_spectrum(rng, shape, s):
  u = np.linalg.qr(rng.standard_normal((shape[0], len(s))))[0]
  v = np.linalg.qr(rng.standard_normal((shape[1], len(s))))[0]
  return (u * s) @ v.T


def _rank_k_error(got, x, k):
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  want = (u[:, :k] * s[:k]) @ vt[:k]
  return np.linalg.norm(np.asarray(got[0] * got[1]) @ np.asarray(got[2]).T - want) / np.linalg.norm(want)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_top_k_triples_gram_route_matches_float64_svd(shape):
  """A flat spectrum (s_k / s_1 = 0.5): the Gram route, as accurate as the float32 SVD."""
  rng = np.random.default_rng(2)
  x = _with_spectrum(rng, shape, np.linspace(1.0, 0.25, 120))
  f = jax.jit(svd_lib.top_k_triples, static_argnums=(1, 2))
  for method in ("auto", "svd"):
    got = f(jnp.asarray(x, jnp.float32), 40, method)
    assert [a.shape for a in got] == [(shape[0], 40), (40,), (shape[1], 40)]
    assert _rank_k_error(got, x, 40) < 1e-5, method
    np.testing.assert_allclose(np.asarray(got[1]), np.linalg.svd(x, compute_uv=False)[:40], rtol=1e-5)


def test_top_k_triples_falls_back_to_svd_for_low_rank_deltas():
  """Rank 10 < k = 40 (a LoRA-like delta): the Gram route would divide by ~0; the SVD runs."""
  rng = np.random.default_rng(3)
  x = _with_spectrum(rng, (200, 120), np.r_[np.linspace(1.0, 0.5, 10), np.zeros(110)])
  u, s, v = jax.jit(svd_lib.top_k_triples, static_argnums=(1, 2))(jnp.asarray(x, jnp.float32), 40, "auto")
  assert np.all(np.isfinite(np.asarray(u))) and np.all(np.isfinite(np.asarray(v)))
  np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(40), atol=1e-5)  # SVD's basis
  assert _rank_k_error((u, s, v), x, 10) < 1e-5


@pytest.mark.parametrize("cond", [3.0, 1e3])
def test_polar_auto_matches_float64_polar(cond):
  """kappa 3: the Gram route; kappa 1e3: its float32 error would be ~eps kappa^2 = 0.1, so the
  SVD runs. Either way within the float32 SVD's accuracy of the exact polar factor."""
  rng = np.random.default_rng(4)
  x = _with_spectrum(rng, (400, 100), np.geomspace(1.0, 1.0 / cond, 100))
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  want = u @ vt
  for method in ("auto", "svd"):
    got = np.asarray(jax.jit(blocks.polar, static_argnums=1)(jnp.asarray(x, jnp.float32), method))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < (1e-5 if cond < 10 else 1e-4), (method, err)


def test_tsv_m_solvers_agree_with_float64_reference():
  rng = np.random.default_rng(5)
  base = rng.standard_normal((240, 96)).astype(np.float32)  # U_hat 240 x 96: the Gram polar
  deltas = [0.1 * rng.standard_normal(base.shape) for _ in range(3)]
  models = [jnp.asarray(base + d, jnp.float32) for d in deltas]
  want = tsvm_reference([np.asarray(m, np.float64) - base for m in models])
  for solver in ("auto", "svd"):
    got = np.asarray(svd_lib.tsv_m(jnp.asarray(base), models, solver=solver), np.float64) - base
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-5, solver
  with pytest.raises(ValueError, match="solver must be one of"):
    svd_lib.tsv_m(jnp.asarray(base), models, solver="qr")
