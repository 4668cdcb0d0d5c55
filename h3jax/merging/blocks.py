"""Building blocks of the merge methods, on single tensors (jit/vmap friendly).

Shapes: N models, X = one tensor's shape (any rank). `density` etc. are Python
floats (static). Each block states which oracle's semantics it follows.
Compose them into new methods; see docs/merging.md.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from h3jax.merging import select


def task_vectors(base_X, models_NX):
  """tau_i = theta_i - theta_0: [N, X]."""
  return models_NX - base_X[None]


# Reductions over the (small, static) model axis N are unrolled into N - 1 elementwise ops:
# XLA:CPU runs a reduce over a leading axis as a strided loop, ~100x slower than the fused
# adds (180 ms vs 1.3 ms for 3 x 1536 x 576). Same order as a sequential sum: a0 + a1 + ...

def unstack(x_NX):
  """[N, X] array or a sequence of N [X] arrays -> list of N [X] arrays. Kernels that keep
  per-model values in lists let XLA:CPU fuse a whole combination into one loop; stacking
  them materializes every [N, X] intermediate (3x slower for TIES)."""
  return [x_NX[i] for i in range(len(x_NX))]


def sum_models(x_NX):
  """sum over axis 0 (the model axis; or of a sequence) -> [X]."""
  return functools.reduce(jnp.add, unstack(x_NX))


def max_models(x_NX):
  """max over axis 0 (the model axis; or of a sequence) -> [X]."""
  return functools.reduce(jnp.maximum, unstack(x_NX))


def mean_models(x_NX):
  """mean over axis 0 (the model axis) -> [X]."""
  return sum_models(x_NX) / x_NX.shape[0]


# ----------------------------------------------------------------------------- sparsification masks

def kth_largest_abs(x_X, k: int):
  """The k-th largest |x| (1 <= k <= numel), exactly, without a sort (`h3jax.merging.select`)."""
  return select.kth_largest_abs(x_X, k)


def exact_topk_mask(x_X, k: int):
  """Exactly the k largest |x|; ties at the k-th magnitude broken by flat index."""
  return select.exact_topk_mask(x_X, k)


def topk_mask(x_X, density: float):
  """mergekit `magnitude`: keep exactly k = max(1, int(density * numel)) largest |x|.

  Ties at the k-th magnitude are broken by flat index (mergekit's argsort is arbitrary).
  """
  return select.topk_mask(x_X, density)


def kth_largest_threshold(x_X, density: float):
  """FusionBench TIES threshold: the magnitude of the (numel - int(numel*density))-th smallest."""
  n = x_X.size
  k = n - int(n * density)
  if n == 0:
    return jnp.float32(0.0)
  if k <= 0:
    return jnp.min(jnp.abs(x_X)).astype(jnp.float32)
  return kth_largest_abs(x_X, n - k + 1)


def threshold_mask(x_X, threshold):
  """FusionBench `topk_values_mask`: keep |x| >= threshold (ties at the threshold kept), and NaN."""
  return (jnp.abs(x_X) >= threshold) | jnp.isnan(x_X)


def outlier_mask(x_X, density: float, gamma: float):
  """mergekit `magnitude_outliers` (Breadcrumbs): drop the top gamma and the smallest values.

  Keeps ascending-|x| positions [n_bot, n_bot + int(density*N)), with
  n_bot = max(0, N - target - int(gamma*N)).
  """
  if density >= 1:
    return jnp.ones(x_X.shape, bool)
  n = x_X.size
  target = int(density * n)
  n_top = int(gamma * n)
  n_bot = max(0, n - target - n_top)
  # Ascending positions [n_bot, n_bot + target) = top (n - n_bot) minus top (n - n_bot - target).
  return exact_topk_mask(x_X, n - n_bot) & ~exact_topk_mask(x_X, n - n_bot - target)


def bernoulli_mask(key, shape, density: float):
  """DARE: keep each entry with probability `density` (= 1 - p)."""
  if density >= 1:
    return jnp.ones(shape, bool)
  return jax.random.bernoulli(key, density, shape)


def della_keep_probs(x_X, density: float, epsilon: float, axis: int = 1):
  """DELLA (mergekit `della_magprune`): per row, p = (d - eps) + 2 eps * rank_norm.

  Ranks |x| along `axis` (mergekit ranks along dim 1 of the HF [out, in] weight;
  for h3jax [in, out] kernels pass axis=0). 1-D tensors are one row.
  """
  if not (0 < density - epsilon and density + epsilon < 1):
    raise ValueError(f"della: epsilon must be chosen such that density +/- epsilon is in (0, 1), "
                     f"got density={density}, epsilon={epsilon}")
  m = jnp.abs(x_X).astype(jnp.float32)
  if m.ndim < 2:
    m, axis = m[None], 1
  m = jnp.moveaxis(m, axis, -1)
  rank = jnp.argsort(jnp.argsort(m, axis=-1, stable=True), axis=-1, stable=True).astype(jnp.float32) + 1
  lo, hi = rank.min(-1, keepdims=True), rank.max(-1, keepdims=True)
  rank_norm = jnp.clip((rank - lo) / (hi - lo), 0, 1)
  probs = (density - epsilon) + rank_norm * 2 * epsilon
  return jnp.moveaxis(probs, -1, axis).reshape(x_X.shape)


# ----------------------------------------------------------------------------- rescaling

def rescale_l1(x_X, masked_X, eps: float = 1e-7):
  """mergekit >= 0.1: scale the masked tensor so its L1 norm equals the original's."""
  before = jnp.sum(jnp.abs(x_X))
  after = jnp.sum(jnp.abs(masked_X))
  ok = (before >= eps) & (after >= eps)
  return jnp.where(ok, masked_X * (before / jnp.where(ok, after, 1.0)), masked_X)


def rescale_inverse(masked_X, keep_prob):
  """Paper DARE / DELLA (mergekit 0.0.6, FusionBench): divide kept values by p_keep."""
  return masked_X / keep_prob


def sparsify(x_X, mask_X, rescale: Optional[str], keep_prob=None):
  """mask * x, then rescale: None | 'l1' (mergekit 0.1.5) | 'inverse' (1/p_keep)."""
  masked = jnp.where(mask_X, x_X, 0.0)
  if rescale is None or rescale is False:
    return masked
  if rescale == "l1":
    return rescale_l1(x_X, masked)
  if rescale == "inverse":
    return rescale_inverse(masked, keep_prob)
  raise ValueError(f"rescale must be None, 'l1' or 'inverse', got {rescale!r}")


# ----------------------------------------------------------------------------- sign election and combination

def elect_sign(deltas_NX, mode: str = "mergekit"):
  """Majority sign per entry.

  mergekit ('sum'): +1 where sum_i delta_i >= 0 else -1 (weighted deltas vote).
  fusion_bench: sign(sum), zeros take the tensor's majority sign.
  """
  total_X = sum_models(deltas_NX)
  if mode == "mergekit":
    return jnp.where(total_X >= 0, 1.0, -1.0)
  if mode == "count":
    return jnp.where(sum_models([jnp.sign(d_X) for d_X in unstack(deltas_NX)]) >= 0, 1.0, -1.0)
  if mode == "fusion_bench":
    s_X = jnp.sign(total_X)
    return jnp.where(s_X == 0, jnp.sign(jnp.sum(s_X)), s_X)
  raise ValueError(f"unknown sign election mode {mode!r}")


def agree_mask(deltas_NX, sign_X):
  """[N, X] (or one model's [X]) True where delta_i is non-zero and has the elected sign, and where
  it is NaN: a NaN input propagates to the merge instead of silently becoming the base value."""
  return jnp.where(sign_X > 0, deltas_NX > 0, deltas_NX < 0) | jnp.isnan(deltas_NX)


def disjoint_merge(deltas_NX, mask_NX, weights_N=None, how: str = "mean"):
  """Combine agreeing entries.

  'mean' with weights: mergekit's sum(mask*w*tau) / sum(mask*w) (deltas already
  weighted; zero divisor -> 1). 'mean' without weights: FusionBench's sum /
  max(count, 1). 'sum': plain sum. 'max': largest agreeing magnitude, signed.
  """
  sel_NX = jnp.where(mask_NX, deltas_NX, 0.0)
  if how == "sum":
    return sum_models(sel_NX)
  if how == "mean":
    if weights_N is None:
      count_X = sum_models((sel_NX != 0).astype(jnp.int32))
      return sum_models(sel_NX) / jnp.maximum(count_X, 1)
    w_NX = jnp.asarray(weights_N, jnp.float32).reshape((-1,) + (1,) * (deltas_NX.ndim - 1))
    div_X = sum_models(jnp.where(mask_NX, w_NX, 0.0))
    return sum_models(sel_NX) / jnp.where(div_X == 0, 1.0, div_X)
  if how == "max":
    sign_X = jnp.sign(sum_models(sel_NX))
    return max_models(jnp.abs(sel_NX)) * sign_X
  raise ValueError(f"unknown disjoint merge {how!r}; expected mean|sum|max")


def weighted_sum(deltas_NX, weights_N: Sequence[float]):
  w_NX = jnp.asarray(weights_N, jnp.float32).reshape((-1,) + (1,) * (deltas_NX.ndim - 1))
  return sum_models(deltas_NX * w_NX)


def combine(base_X, deltas_NX, weights_N, *, lambda_: float = 1.0, normalize: bool = False,
            consensus: Optional[str] = None):
  """mergekit's generalized task arithmetic after sparsification.

  deltas_NX: [N, X] or a sequence of N [X] arrays. deltas are weighted by w_i; with
  `consensus` ('mergekit' | 'count' | 'fusion_bench') only sign-agreeing entries are kept and
  `normalize` divides by the agreeing weights, otherwise by sum(w) (|sum| < 1e-8 -> 1). Then
  base + lambda * delta.
  """
  w_N = jnp.asarray(weights_N, jnp.float32)
  wd = [d_X * w_N[i] for i, d_X in enumerate(unstack(deltas_NX))]  # per model: one fused loop
  if consensus:
    sign_X = elect_sign(wd, consensus)
    keep = [agree_mask(d_X, sign_X) for d_X in wd]
    mixed_X = sum_models([jnp.where(k_X, d_X, 0.0) for k_X, d_X in zip(keep, wd)])
    div_X = sum_models([jnp.where(k_X, w_N[i], 0.0) for i, k_X in enumerate(keep)])
    div_X = jnp.where(div_X == 0, 1.0, div_X)
  else:
    mixed_X = sum_models(wd)
    div = jnp.sum(jnp.asarray(weights_N, jnp.float32))
    div_X = jnp.where(jnp.abs(div) < 1e-8, 1.0, div)
  if normalize:
    mixed_X = mixed_X / div_X
  return base_X + lambda_ * mixed_X


def tall_masks(deltas_NX, merged_X, lambdas_N: Sequence[float], strict: bool = False):
  """TALL masks m_t = |tau_t| >= lambda_t * |merged - tau_t| ('>' with strict)."""
  lam_NX = jnp.asarray(lambdas_N, jnp.float32).reshape((-1,) + (1,) * (deltas_NX.ndim - 1))
  lhs, rhs = jnp.abs(deltas_NX), lam_NX * jnp.abs(merged_X[None] - deltas_NX)
  return lhs > rhs if strict else lhs >= rhs


# ----------------------------------------------------------------------------- low-rank / SVD pieces

def svd(x_MN):
  """Thin SVD in float32: (U [M, r], s [r], Vt [r, N])."""
  return jnp.linalg.svd(x_MN.astype(jnp.float32), full_matrices=False)


# `polar(method='auto')` takes the Gram route only where kappa(x)^2 <= 100, so its float32 error
# (~eps kappa^2) stays ~1e-5, the size of an SVD's own float32 differences.
POLAR_GRAM_MIN_RATIO = 1e-2
# Singular values of x below POLAR_RANK_RTOL * s_1 are numerically zero: their singular vectors are
# arbitrary (rounding decides them), so the polar factor leaves them out. Measured in float32: the
# exact zeros of a duplicated stack [A | A] come out <= 7.9e-7 s_1 (shapes 8 x 4 to 2048 x 2048), those
# of TSV-M's stacks for antipodal experts (tau, -tau: two SVDs' rounding) <= 1e-6 s_1; a real direction
# sat at 8e-6 s_1 (TSV-M of SmolLM2 variants, layer 5 q_proj, which fusion-bench resolves to 8e-6 of
# float64): the earlier 1e-5 cut dropped it, a 4 % error.
POLAR_RANK_RTOL = 4e-6


def polar(x_MK, method: str = "auto"):
  """Orthogonal polar factor U V^T of x (nearest matrix with orthonormal columns).

  For a rank-deficient x (zero columns from dropped triples, repeated columns from identical
  experts) the factor is not unique; this returns the partial isometry sum_{s_i > rtol s_1}
  u_i v_i^T (POLAR_RANK_RTOL): [A | 0] -> [polar(A) | 0], [A | A] -> [A | A] / sqrt(2) for
  orthonormal A, and 0 for x = 0. method 'svd': from a thin SVD. 'auto': for tall x (M >= 2K)
  whose Gram matrix has lambda_min >= 1e-2 lambda_max > 0, x (x^T x)^{-1/2} from the
  eigendecomposition of the K x K Gram matrix (on CPU ~3x cheaper than the SVD of x); otherwise
  the SVD (`lax.cond`: one branch runs). Square stacks of singular-vector blocks (TSV-M's) are
  rarely that well conditioned, so they go straight to the SVD.
  """
  if method not in ("auto", "svd"):
    raise ValueError(f"polar: method must be 'auto' or 'svd', got {method!r}")
  hi = jax.lax.Precision.HIGHEST

  def by_svd():
    u, s, vt = jnp.linalg.svd(x_MK, full_matrices=False)
    keep = s > POLAR_RANK_RTOL * s[0]  # s descending; x = 0 keeps nothing
    return jnp.matmul(u * keep, vt, precision=hi)

  if method == "svd" or x_MK.shape[0] < 2 * x_MK.shape[1]:
    return by_svd()
  lam_K, w_KK = jnp.linalg.eigh(jnp.matmul(x_MK.T, x_MK, precision=hi))  # ascending

  def by_gram():
    inv_sqrt_KK = jnp.matmul(w_KK * jax.lax.rsqrt(jnp.maximum(lam_K, 1e-30)), w_KK.T, precision=hi)
    return jnp.matmul(x_MK, inv_sqrt_KK, precision=hi)

  well_conditioned = (lam_K[0] >= POLAR_GRAM_MIN_RATIO * lam_K[-1]) & (lam_K[-1] > 0)
  return jax.lax.cond(well_conditioned, by_gram, by_svd)


def low_rank(x_MN, rank: int):
  """Best rank-`rank` approximation (Eckart-Young)."""
  u, s, vt = svd(x_MN)
  return (u[:, :rank] * s[:rank]) @ vt[:rank]


def numerical_rank_mask(s_r, rtol: float = 1e-5):
  """True for singular values above rtol * s_max (LoRA deltas: drop the null space)."""
  return s_r > rtol * jnp.max(s_r)
