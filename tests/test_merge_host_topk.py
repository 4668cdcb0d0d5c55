"""The driver's mergekit-TIES fast path (host top-k cuts + one kernel) == h3jax.merging.ties."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from h3jax import merging
from h3jax.merging.streaming import host_topk


@pytest.mark.parametrize("kind", ["dense", "sparse", "ties", "bf16"])
def test_fast_ties_equals_tree_ties(kind):
  """Tensors above select.BRACKET_MIN: the cuts come from the native pass where it is built. bf16 inputs
  merge as their exact float32 casts."""
  rng = np.random.default_rng(["dense", "sparse", "ties", "bf16"].index(kind))
  base = rng.standard_normal((300, 257)).astype(np.float32)  # > 4 x 16384: the bracket path
  models = []
  for _ in range(3):
    if kind == "dense":
      d = rng.standard_normal(base.shape)
    elif kind == "sparse":  # 5% touched: the k-th |tau| is 0 (zeros are dropped, not tie-broken)
      d = np.where(rng.random(base.shape) < 0.05, rng.standard_normal(base.shape), 0.0)
    else:  # repeated magnitudes at the cut: the flat-index tie-break decides (bf16: its rounding ties more)
      d = rng.integers(-3, 4, base.shape) * 0.25 if kind == "ties" else rng.standard_normal(base.shape)
    models.append((base + d).astype(np.float32))
  if kind == "bf16":
    base, models = base.astype(ml_dtypes.bfloat16), [m.astype(ml_dtypes.bfloat16) for m in models]
  kw = dict(weight=(1.0, 0.5, 2.0), density=(0.2, 0.5, 0.9), lambda_=0.7, normalize=True, rescale=False)
  hp = host_topk.ties_hparams("ties", kw, 3)
  thr, cut = host_topk.host_cuts(base, models, kw["density"])
  got = np.asarray(host_topk.ties_kernel(hp, None)(base, models, thr, cut))
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  want = np.asarray(merging.ties(f32(base), [f32(m) for m in models], **kw))
  np.testing.assert_array_equal(got, want)


def test_fast_path_only_for_plain_mergekit_ties():
  assert host_topk.ties_hparams("ties", dict(density=0.2), 2) is not None
  assert host_topk.ties_hparams("ties", dict(density=0.2, mode="fusion_bench"), 2) is None
  assert host_topk.ties_hparams("dare_ties", dict(density=0.2), 2) is None
  assert host_topk.ties_hparams("ties", dict(density=((0.1, 0.9),) * 2), 2) is None  # gradient
