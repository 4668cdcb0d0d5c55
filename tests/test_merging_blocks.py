"""Building blocks of h3jax.merging and the path -> rule machinery, on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax.merging import blocks, rules
from numerics import assert_close


def test_topk_mask_keeps_exactly_k_largest_with_index_tie_break():
  x = jnp.array([[0.5, -3.0, 1.0], [2.0, -1.0, 0.1]])
  # density 0.5 of 6 -> k = 3: |x| sorted desc = 3, 2, 1, 1, .5, .1; tie at 1 -> first index.
  np.testing.assert_array_equal(blocks.topk_mask(x, 0.5), [[0, 1, 1], [1, 0, 0]])
  assert int(blocks.topk_mask(x, 0.01).sum()) == 1  # at least one kept (mergekit)
  assert bool(blocks.topk_mask(x, 1.0).all())


def test_fusion_bench_threshold_keeps_ties():
  x = jnp.array([1.0, -1.0, 0.5, 2.0, 0.1])
  thr = blocks.kth_largest_threshold(x, 0.4)  # k = 5 - 2 = 3rd smallest |x| = 1.0
  assert float(thr) == 1.0
  np.testing.assert_array_equal(blocks.threshold_mask(x, thr), [1, 1, 0, 1, 0])


def test_outlier_mask_breadcrumbs():
  x = jnp.arange(1.0, 11.0)  # |x| ascending = index order
  # N=10, density .5 -> target 5; gamma .2 -> n_top 2; n_bot = 3 -> keep ranks 3..7.
  np.testing.assert_array_equal(blocks.outlier_mask(x, 0.5, 0.2), [0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
  # gamma >= 1 - density: n_bot = 0, exactly `target` kept (the smallest ones, as mergekit).
  np.testing.assert_array_equal(blocks.outlier_mask(x, 0.5, 0.8), [1] * 5 + [0] * 5)


def test_della_keep_probs_per_row_and_axis():
  x = jnp.array([[0.1, -0.3, 0.2], [5.0, 1.0, -2.0]])
  p = blocks.della_keep_probs(x, 0.5, 0.1)
  assert_close(p, [[0.4, 0.6, 0.5], [0.6, 0.4, 0.5]], rtol=3e-6)
  assert_close(blocks.della_keep_probs(x.T, 0.5, 0.1, axis=0), p.T, rtol=3e-6)
  with pytest.raises(ValueError, match="density \\+/- epsilon"):
    blocks.della_keep_probs(x, 0.5, 0.5)


def test_rescales():
  x = jnp.array([1.0, -2.0, 3.0, -4.0])
  mask = jnp.array([True, False, False, True])
  out = blocks.sparsify(x, mask, "l1")
  np.testing.assert_allclose(out, np.array([1.0, 0, 0, -4.0]) * 10 / 5)
  np.testing.assert_allclose(blocks.sparsify(x, mask, "inverse", 0.5), [2.0, 0, 0, -8.0])
  np.testing.assert_allclose(blocks.sparsify(x, ~jnp.ones(4, bool), "l1"), 0.0)  # empty mask: no 0/0


def test_bernoulli_mask_rate_and_reproducibility():
  k = jax.random.key(3)
  m = blocks.bernoulli_mask(k, (200, 200), 0.3)
  assert abs(float(m.mean()) - 0.3) < 0.01
  np.testing.assert_array_equal(m, blocks.bernoulli_mask(k, (200, 200), 0.3))


def test_sign_election_modes():
  d = jnp.array([[1.0, -1.0, 0.0, 2.0], [-2.0, 1.0, 0.0, -1.0]])
  np.testing.assert_array_equal(blocks.elect_sign(d, "mergekit"), [-1, 1, 1, 1])
  # fusion_bench: sign(sum) = [-1, 0, 0, 1], zeros take the majority sign(sum of signs) = 0 -> 0.
  np.testing.assert_array_equal(blocks.elect_sign(d, "fusion_bench"), [-1, 0, 0, 1])
  d2 = jnp.array([[1.0, 0.0, 3.0], [1.0, 0.0, -1.0]])
  np.testing.assert_array_equal(blocks.elect_sign(d2, "fusion_bench"), [1, 1, 1])


def test_disjoint_merge_and_combine_hand_computed():
  d = jnp.array([[1.0, -2.0, 3.0], [3.0, 1.0, -1.0]])
  sign = blocks.elect_sign(d, "mergekit")  # [1, -1, 1]
  mask = blocks.agree_mask(d, sign)
  np.testing.assert_allclose(blocks.disjoint_merge(d, mask, None, "mean"), [2.0, -2.0, 3.0])
  np.testing.assert_allclose(blocks.disjoint_merge(d, mask, None, "sum"), [4.0, -2.0, 3.0])
  np.testing.assert_allclose(blocks.disjoint_merge(d, mask, None, "max"), [3.0, -2.0, 3.0])
  base = jnp.array([10.0, 10.0, 10.0])
  # Weighted TIES combine: weights 1, 2 -> deltas [1,-2,3],[6,2,-2]; signs +,+,+;
  # agreeing: [1+6, 2, 3] / [3, 2, 1].
  out = blocks.combine(base, d, [1.0, 2.0], normalize=True, consensus="mergekit")
  np.testing.assert_allclose(out, [10 + 7 / 3, 11.0, 13.0], rtol=1e-6)
  np.testing.assert_allclose(blocks.combine(base, d, [1.0, 2.0], lambda_=0.5),
                             base + 0.5 * (d[0] + 2 * d[1]))


def test_tall_masks():
  d = jnp.array([[1.0, 0.1], [0.2, 2.0]])
  merged = d.sum(0)
  np.testing.assert_array_equal(blocks.tall_masks(d, merged, [1.0, 1.0]), [[1, 0], [0, 1]])


def test_polar_and_low_rank():
  x = jax.random.normal(jax.random.key(0), (7, 4))
  q = blocks.polar(x)
  assert_close(q.T @ q, np.eye(4), rtol=1e-5, atol_rel=1e-5)
  a = jax.random.normal(jax.random.key(1), (6, 2)) @ jax.random.normal(jax.random.key(2), (2, 5))
  assert_close(blocks.low_rank(a, 2), a, rtol=1e-5, atol_rel=1e-5)  # LAPACK
  assert int(blocks.numerical_rank_mask(blocks.svd(a)[1]).sum()) == 2


@pytest.mark.parametrize("m,k", [(8, 4), (96, 48), (576, 576)])
def test_polar_keeps_a_small_well_separated_direction_and_drops_exact_zeros(m, k):
  """A real singular value of 8e-6 s_1 (one of a SmolLM2 TSV-M's V stacks had it) is well
  separated from the rest, so float32 resolves its direction (to ~1e-2 of it: the polar factor's
  condition number is 1/s_k) and the polar factor must keep it; a fixed 1e-5 cut dropped it
  (relative error 1/sqrt(k)). The exact zeros of [A | A] are rounding
  (<= 7.9e-7 s_1) and stay out: the partial isometry [A | A] / sqrt(2)."""
  rng = np.random.default_rng(m)
  u = np.linalg.qr(rng.standard_normal((m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((k, k)))[0]
  s = np.linspace(1.0, 0.5, k)
  s[-1] = 8e-6
  x = (u * s) @ v.T
  x32 = x.astype(np.float32)
  got = np.asarray(blocks.polar(jnp.asarray(x32), "svd"), np.float64)
  u64, _, vt64 = np.linalg.svd(x32.astype(np.float64), full_matrices=False)
  want = u64 @ vt64
  # Dropping the direction is an error of exactly 1/sqrt(k); float32 resolves it to ~1e-2 of itself.
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1 / np.sqrt(k)
  a = u[:, : max(1, k // 2)]
  aa = np.concatenate([a, a], 1)
  got = np.asarray(blocks.polar(jnp.asarray(aa, jnp.float32), "svd"), np.float64)
  assert np.linalg.norm(got - aa / np.sqrt(2)) / np.linalg.norm(aa / np.sqrt(2)) < 1e-5
  assert blocks.POLAR_RANK_RTOL < 8e-6


def test_rules_first_match_wins_and_kinds():
  table = [("layers/attn/*", {"density": 0.3}), ("re:q_proj", {"density": 0.9, "gamma": 0.2}),
           ("sub:mlp", {"keep_base": True})]
  assert rules.resolve("layers/attn/q_proj/kernel", table, {"density": 1.0}) == {"density": 0.3, "gamma": 0.2}
  assert rules.resolve("layers/mlp/up_proj/kernel", table, {"density": 1.0})["keep_base"]
  assert rules.resolve("embed/embedding", table, {"density": 1.0}) == {"density": 1.0}
  with pytest.raises(ValueError, match="each rule must be"):
    rules.validate_rules([("x", 1)])
  assert rules.default_batch_dims("layers/moe/experts/up_proj/kernel") == 2
  assert rules.default_batch_dims("layers/attn/q_proj/kernel") == 1
  assert rules.default_batch_dims("lm_head/kernel") == 0


def test_gradient_values_follow_mergekit():
  assert rules.gradient_value([0.0, 1.0], 0.25) == 0.25
  assert rules.gradient_value([0.0, 0.5, 1.0], 0.75) == pytest.approx(0.75)
  assert rules.gradient_value([0.0, 1.0, 0.0], 1.0) == 0.0
  assert rules.gradient_value(0.4, 0.9) == 0.4
  assert rules.per_model("weight", 0.5, 3) == (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="weight has 2 values but there are 3 models"):
    rules.per_model("weight", [1, 2], 3)


def test_kth_largest_by_bisection_matches_sort():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_t(2, 500), rng.integers(-3, 4, 200), [0.0, -0.0, 1e-40, np.inf]])
  x = x.astype(np.float32)
  a = np.sort(np.abs(x))[::-1]
  for k in (1, 2, 77, 400, x.size):
    assert float(blocks.kth_largest_abs(jnp.asarray(x), k)) == a[k - 1]
    m = np.asarray(blocks.exact_topk_mask(jnp.asarray(x), k))
    assert m.sum() == k and np.abs(x[m]).min() >= np.abs(x[~m]).max(initial=0)
