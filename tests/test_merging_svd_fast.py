"""Sort-free / SVD-free fast paths of TSV-M against float64 numpy SVD references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.merging import svd as svd_lib


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
    np.testing.assert_allclose(np.asarray(u * s) @ np.asarray(v).T,
                               (u_ref[:, :16] * s_ref[:16]) @ vt_ref[:16], atol=1e-4)


def test_tsv_m_fast_path_matches_float64_reference():
  rng = np.random.default_rng(1)
  base = rng.standard_normal((160, 96)).astype(np.float32)
  deltas = [np.where(rng.random(base.shape) < 0.05, rng.standard_normal(base.shape), 0.0)
            for _ in range(3)]  # k = 32, q = 64 < 96: the Gram / Rayleigh-Ritz path
  models = [jnp.asarray(base + d, jnp.float32) for d in deltas]
  got = np.asarray(svd_lib.tsv_m(jnp.asarray(base), models, topk="gram"), np.float64) - base
  want = tsvm_reference([np.asarray(m, np.float64) - base for m in models])
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
