"""SVD-based merges: TSV-M (Gargiulo 2025), Iso-C and Iso-CTS (Marczak 2025).

FusionBench 0.2.33 semantics. 2-D tensors (after unstacking layers/experts) go
through the SVD path; 1-D tensors and `exclude` rules get alpha * mean(tau).
Maths in float32, output in the base's dtype. Hyper-parameter names follow
FusionBench: `alpha` (TSV-M), `scaling_factor`, `common_space_fraction` (Iso).

Rank-deficient deltas (LoRA experts) make these methods implementation-defined
(arbitrary null-space directions leak through the polar step); pass
`rank_cap='numerical'` to TSV-M to drop singular triples below `rank_rtol * s_max`
per task (columns are zeroed, which equals truncation because the polar factor of
[A | 0] is [polar(A) | *]). The default (None) matches FusionBench.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from h3jax.merging import blocks
from h3jax.merging import tree as tree_lib
from h3jax.merging.tree import common_kwargs, pop_lambda


_HI = jax.lax.Precision.HIGHEST


def _scale_tasks(deltas_NX, alpha):
  """A per-task alpha list scales each tau before the merge; returns (deltas, final scale)."""
  if isinstance(alpha, tuple):
    a_N = jnp.asarray(alpha, jnp.float32).reshape((-1,) + (1,) * (deltas_NX.ndim - 1))
    return deltas_NX * a_N, 1.0
  return deltas_NX, alpha


def mean_delta_array(base_X, models_NX, key, *, alpha=1.0, **unused):
  """Fallback for 1-D / excluded tensors: theta_0 + alpha * mean_t tau_t."""
  deltas_NX, scale = _scale_tasks(blocks.task_vectors(base_X, models_NX), alpha)
  return base_X + scale * blocks.mean_models(deltas_NX)


# `top_k_triples(method='auto')` takes the Gram route only where s_k >= 0.1 s_1 > 0: the k-th
# vectors then carry a float32 error of ~eps (s_1 / s_k)^2 <= 1e-5.
GRAM_MIN_SV_RATIO = 0.1
# `top_singular` (solver='gram') runs its Rayleigh-Ritz step only where lambda_k > 1e-6 lambda_1
# (s_k > 1e-3 s_1); below, the k-th triple is (close to) numerically zero, its direction is
# rounding noise, and the SVD runs so that every solver returns the same triples.
TOP_SINGULAR_MIN_EIG_RATIO = 1e-6


def _pow2_scale(x):
  """A power of two >= max|x| (1 for x = 0). Dividing by it is exact, and keeps the Gram matrix
  of x / scale (entries <= numel) away from float32 underflow for tiny task vectors."""
  m = jnp.max(jnp.abs(x))
  _, e = jnp.frexp(jnp.where(m > 0, m, 1.0).astype(jnp.float32))
  return jnp.ldexp(jnp.float32(1.0), e)


def drop_zero_triples(u_Mk, s_k, v_Nk, tau_MN=None):
  """Zeroes the triples with s = 0 (all of them where tau = 0): a zero singular value has no
  singular direction (its vectors are whatever the solver returns for a null space), so it
  contributes nothing, not even to the orthogonalization of the other tasks' vectors."""
  keep_k = s_k > 0
  if tau_MN is not None:
    keep_k = keep_k & jnp.any(tau_MN != 0)
  return u_Mk * keep_k, jnp.where(keep_k, s_k, 0.0), v_Nk * keep_k


def top_k_triples(tau_MN, k: int, method: str = "auto"):
  """Top-k singular triples of tau: U [M, k], s [k], V [N, k].

  method 'svd': slices of a full thin SVD (FusionBench's way). 'auto': the eigendecomposition
  of the Gram matrix of the short side gives s and those singular vectors, tau times them the
  others (on CPU ~3x cheaper than the SVD); where s_k < 0.1 s_1 (a fast-decaying or low-rank
  spectrum, whose small triples the Gram matrix resolves poorly) or s_k = 0 the SVD runs
  instead, so the route never divides by a zero singular value. The Gram matrix is formed
  from tau / 2^e (exact) so that tiny task vectors do not underflow. Either method returns
  zeros for tau = 0 without decomposing it (`_unless_zero`).
  """
  def by_svd():
    u_MR, s_R, vt_RN = blocks.svd(tau_MN)
    return u_MR[:, :k], s_R[:k], vt_RN[:k].T

  if method == "svd":
    return _unless_zero(tau_MN, (k,), by_svd)
  if method != "auto":
    raise ValueError(f"top_k_triples: method must be 'auto' or 'svd', got {method!r}")
  m, n = tau_MN.shape

  def auto():
    t_mn = tau_MN.astype(jnp.float32) if m >= n else tau_MN.astype(jnp.float32).T  # m >= n
    scale = _pow2_scale(t_mn)
    t_mn = t_mn / scale
    lam_n, w_nn = jnp.linalg.eigh(jnp.matmul(t_mn.T, t_mn, precision=_HI))  # ascending
    w_nk, s_k = w_nn[:, ::-1][:, :k], jnp.sqrt(jnp.maximum(lam_n[::-1][:k], 0.0))

    def by_gram():
      u_mk = jnp.matmul(t_mn, w_nk, precision=_HI) / s_k
      return (u_mk, s_k * scale, w_nk) if m >= n else (w_nk, s_k * scale, u_mk)

    ok = (s_k[-1] >= GRAM_MIN_SV_RATIO * s_k[0]) & (s_k[-1] > 0)
    return jax.lax.cond(ok, by_gram, by_svd)

  return _unless_zero(tau_MN, (k,), auto)


def _unless_zero(tau_MN, k_shape, triples):
  """triples() unless tau = 0 (a tensor LoRA never touched), which has no singular triples: zeros
  then, as `drop_zero_triples` would leave them, without the SVD of a zero matrix (`lax.cond`: one
  branch runs)."""
  m, n = tau_MN.shape
  zeros = lambda: (jnp.zeros((m,) + k_shape, jnp.float32), jnp.zeros(k_shape, jnp.float32),
                   jnp.zeros((n,) + k_shape, jnp.float32))
  return jax.lax.cond(jnp.any(tau_MN != 0), triples, zeros)


def tsv_factors(deltas_NMN, k: int, keep_TK=None, method: str = "auto"):
  """Concatenated top-k singular triples of each task: U_hat [M, T*k], s_hat [T*k], V_hat [N, T*k].

  keep_TK (optional bool [T, k]) zeroes triples (rank caps, per-layer ranks); triples with s = 0
  are zeroed too (`drop_zero_triples`). method: `top_k_triples`'s.
  """
  us, ss, vs = [], [], []
  for t in range(deltas_NMN.shape[0]):
    u_Mk, s_k, v_Nk = drop_zero_triples(*top_k_triples(deltas_NMN[t], k, method), deltas_NMN[t])
    if keep_TK is not None:
      keep_k = keep_TK[t]
      u_Mk, s_k, v_Nk = u_Mk * keep_k, s_k * keep_k, v_Nk * keep_k
    us.append(u_Mk)
    ss.append(s_k)
    vs.append(v_Nk)
  return jnp.concatenate(us, 1), jnp.concatenate(ss), jnp.concatenate(vs, 1)  # [M, Tk], [Tk], [N, Tk]


def top_singular(tau_MN, k: int):
  """Top-k singular triples (U [M, k], s [k], V [N, k]) without a full SVD.

  The Gram matrix of the short side (one syrk) gives, by `eigh`, the top q = k +
  max(32, k/2) right singular directions; one subspace (power) step sharpens them
  so that the k-th is accurate despite the squared spectrum; a thin SVD of
  tau @ W [M, q] (Rayleigh-Ritz) then gives the triples with the accuracy of an SVD
  of tau itself. ~2-3x fewer flops than the full SVD FusionBench takes; matmuls at
  HIGHEST precision (TF32 would perturb near-degenerate directions on GPUs). Where
  lambda_k <= 1e-6 lambda_1 (rank < k, tau = 0: TOP_SINGULAR_MIN_EIG_RATIO) the thin SVD of
  tau runs instead (`lax.cond`), so null-space triples are the SVD's, as with the other solvers.
  """
  m, n = tau_MN.shape
  t_mn = tau_MN if m >= n else tau_MN.T  # [m, n], m >= n
  t_mn = t_mn.astype(jnp.float32)
  scale = _pow2_scale(t_mn)
  t_mn = t_mn / scale
  n_short = t_mn.shape[1]
  q = min(n_short, k + max(32, k // 2))

  def by_svd():  # the same call as solver='svd' (the null-space vectors are the SVD's rounding)
    u_MR, s_R, vt_RN = blocks.svd(tau_MN)
    u_mk, v_nk = (u_MR[:, :k], vt_RN[:k].T) if m >= n else (vt_RN[:k].T, u_MR[:, :k])
    return u_mk, s_R[:k] / scale, v_nk

  def nonzero():  # the Gram eigh too runs only for tau != 0
    g_nn = jnp.matmul(t_mn.T, t_mn, precision=_HI)
    lam_n, w_nn = jnp.linalg.eigh(g_nn)  # ascending

    def by_rr():
      w_nq, _ = jnp.linalg.qr(jnp.matmul(g_nn, w_nn[:, ::-1][:, :q], precision=_HI))
      ub_mq, s_q, vbt_qq = jnp.linalg.svd(jnp.matmul(t_mn, w_nq, precision=_HI), full_matrices=False)
      return ub_mq[:, :k], s_q[:k], jnp.matmul(w_nq, vbt_qq[:k].T, precision=_HI)

    ok = (lam_n[n_short - k] > TOP_SINGULAR_MIN_EIG_RATIO * lam_n[-1]) & (lam_n[-1] > 0)
    return jax.lax.cond(ok, by_rr, by_svd)

  u_mk, s_k, v_nk = _unless_zero(t_mn, (k,), nonzero)
  s_k = s_k * scale
  return (u_mk, s_k, v_nk) if m >= n else (v_nk, s_k, u_mk)


def tsv_factors_fast(deltas_NMN, k: int):
  """tsv_factors via `top_singular` (same maths, no full SVD per task)."""
  us, ss, vs = zip(*[drop_zero_triples(*top_singular(deltas_NMN[t], k), deltas_NMN[t])
                     for t in range(deltas_NMN.shape[0])])
  return jnp.concatenate(us, 1), jnp.concatenate(ss), jnp.concatenate(vs, 1)  # [M, Tk], [Tk], [N, Tk]


def factored_svd(b_MR, a_RN):
  """Thin SVD of a low-rank product b @ a (a LoRA delta) from QRs of its factors:
  O((M + N) R^2) instead of an M x N SVD. Returns (U [M, R], s [R], V [N, R])."""
  qb_MR, rb_RR = jnp.linalg.qr(b_MR.astype(jnp.float32))
  qa_NR, ra_RR = jnp.linalg.qr(a_RN.astype(jnp.float32).T)
  u_RR, s_R, vt_RR = jnp.linalg.svd(rb_RR @ ra_RR.T)
  return qb_MR @ u_RR, s_R, qa_NR @ vt_RR.T


def tsv_lora_delta(bs, as_, alpha: float = 1.0):
  """TSV-M Delta for LoRA task vectors tau_t = b_t @ a_t, capped at each factor's rank:
  the factored counterpart of tsv_m(..., rank_cap='numerical') when R_t <= r / T."""
  us, ss, vs = zip(*[drop_zero_triples(*factored_svd(b, a)) for b, a in zip(bs, as_)])
  return alpha * tsv_combine(jnp.concatenate(us, 1), jnp.concatenate(ss), jnp.concatenate(vs, 1))


def tsv_combine(u_MK, s_K, v_NK, method: str = "auto"):
  """Delta = polar(U_hat) diag(s_hat) polar(V_hat)^T (`blocks.polar`'s method)."""
  return jnp.matmul(blocks.polar(u_MK, method) * s_K, blocks.polar(v_NK, method).T, precision=_HI)


SOLVERS = ("auto", "svd", "gram")


def _check_rank_cap(name, rank_cap):
  if rank_cap not in (None, "numerical"):
    raise ValueError(f"{name}: rank_cap must be None or 'numerical', got {rank_cap!r}")


def _check_solver(name, solver):
  if solver not in SOLVERS:
    raise ValueError(f"{name}: solver must be one of {SOLVERS}, got {solver!r}")
  return "svd" if solver == "svd" else "auto"  # the method of top_k_triples and polar


def _tsvm_array(base_X, models_NX, key, *, alpha=1.0, rank_ratio=None, rank_cap=None,
                rank_rtol=1e-5, solver="auto"):
  if base_X.ndim != 2:
    return mean_delta_array(base_X, models_NX, key, alpha=alpha)
  deltas_NMN, scale = _scale_tasks(blocks.task_vectors(base_X, models_NX), alpha)
  n_tasks = deltas_NMN.shape[0]
  r = min(base_X.shape)
  k = int(r * (rank_ratio if rank_ratio is not None else 1 / n_tasks))
  if k == 0:
    return base_X
  method = _check_solver("tsv_m", solver)

  def delta():
    keep = None
    if rank_cap == "numerical":
      keep = jnp.stack([blocks.numerical_rank_mask(blocks.svd(d)[1], rank_rtol)[:k] for d in deltas_NMN])
    if solver == "gram" and keep is None and k + max(32, k // 2) < r:  # Rayleigh-Ritz top-k
      u_MK, s_K, v_NK = tsv_factors_fast(deltas_NMN, k)
    else:
      # A numerical rank cap is for low-rank (LoRA) deltas, where the Gram route would only fall back.
      u_MK, s_K, v_NK = tsv_factors(deltas_NMN, k, keep, "svd" if keep is not None else method)
    return tsv_combine(u_MK, s_K, v_NK, method)

  # Every task vector zero (the attention and embeddings of LoRA-on-FFN experts): Delta = 0 exactly,
  # with no decomposition run.
  zero = lambda: jnp.zeros(base_X.shape, jnp.float32)
  return base_X + scale * jax.lax.cond(jnp.any(deltas_NMN != 0), delta, zero)


def _alpha(alpha):
  return tuple(float(a) for a in alpha) if isinstance(alpha, (list, tuple)) else float(alpha)


def tsv_m(base, models, *, alpha=1.0, rank_ratio=None, rank_cap=None, rank_rtol=1e-5, solver="auto",
          **kw):
  """Task Singular Vector Merging: per 2-D tensor, keep each task's top floor(r/T) singular
  triples, orthogonalise the concatenated U and V by their polar factors, theta_0 + alpha * Delta.
  alpha may be a per-task list (scales each tau first). rank_ratio overrides 1/T.
  solver: 'auto' (eigendecompositions of Gram matrices where they are well conditioned, SVDs
  elsewhere: `top_k_triples`, `blocks.polar`; ~1.6x faster on CPU, within ~2e-5 of 'svd') |
  'svd' (FusionBench's algorithm: SVDs throughout) | 'gram' (per-task top-k by `top_singular`)."""
  pop_lambda("tsv_m", None, dict(kw))
  _check_solver("tsv_m", solver)
  _check_rank_cap("tsv_m", rank_cap)
  hp = dict(alpha=_alpha(alpha), rank_ratio=rank_ratio, rank_cap=rank_cap,
            rank_rtol=float(rank_rtol), solver=solver)
  return tree_lib.merge_tree(_tsvm_array, base, models, name="tsv_m", hparams=hp,
                             exclude_fn=mean_delta_array, **common_kwargs(kw))


def _iso_c_array(base_X, models_NX, key, *, scaling_factor=1.0):
  deltas_NX = blocks.task_vectors(base_X, models_NX)
  if base_X.ndim != 2:
    return base_X + scaling_factor * blocks.mean_models(deltas_NX)
  u_MR, s_R, vt_RN = blocks.svd(blocks.sum_models(deltas_NX))
  return base_X + scaling_factor * (u_MR * jnp.mean(s_R)) @ vt_RN


def iso_c(base, models, *, scaling_factor=1.0, **kw):
  """Iso-C: sum of task vectors with a flat (isotropic) spectrum, mean(S) U V^T."""
  pop_lambda("iso_c", None, dict(kw))
  return tree_lib.merge_tree(_iso_c_array, base, models, name="iso_c",
                             hparams=dict(scaling_factor=float(scaling_factor)),
                             exclude_fn=_iso_mean_array, **common_kwargs(kw))


def _iso_mean_array(base_X, models_NX, key, *, scaling_factor=1.0, **unused):
  return base_X + scaling_factor * blocks.mean_models(blocks.task_vectors(base_X, models_NX))


def iso_cts_sizes(shape, n_tasks: int, common_space_fraction: float):
  """FusionBench's (common size, per-task size); uses Python's round like the reference."""
  r = min(shape)
  common = int(r * common_space_fraction)
  common = r - round((r - common) / n_tasks) * n_tasks
  return common, int((r - common) / n_tasks)


def _iso_cts_array(base_X, models_NX, key, *, scaling_factor=1.0, common_space_fraction=0.8):
  deltas_NX = blocks.task_vectors(base_X, models_NX)
  if base_X.ndim != 2:
    return base_X + scaling_factor * blocks.mean_models(deltas_NX)
  n = deltas_NX.shape[0]
  kc, kt = iso_cts_sizes(base_X.shape, n, common_space_fraction)
  u_MR, s_R, vt_RN = blocks.svd(blocks.sum_models(deltas_NX))
  uc_MC, sc_C, vc_NC = drop_zero_triples(u_MR[:, :kc], s_R[:kc], vt_RN[:kc].T)  # common subspace
  us, ss, vs = [], [], []
  for t in range(n):
    resid_MN = deltas_NX[t] - uc_MC @ (uc_MC.T @ deltas_NX[t])
    ut_MR, st_R, vtt_RN = blocks.svd(resid_MN)
    # A zero residual (a zero task, or one inside the common subspace) adds no direction.
    ut_Mk, st_k, vt_Nk = drop_zero_triples(ut_MR[:, :kt], st_R[:kt], vtt_RN[:kt].T, resid_MN)
    us.append(ut_Mk)
    ss.append(st_k)
    vs.append(vt_Nk)
  u_MR = jnp.concatenate(us + [uc_MC], 1)  # T*kt + kc = R columns
  s_R = jnp.concatenate(ss + [sc_C])
  v_NR = jnp.concatenate(vs + [vc_NC], 1)
  delta_MN = (blocks.polar(u_MR) * jnp.mean(s_R)) @ blocks.polar(v_NR).T
  return base_X + scaling_factor * delta_MN


def iso_cts(base, models, *, scaling_factor=1.0, common_space_fraction=0.8, **kw):
  """Iso-CTS: common subspace of sum(tau) plus each task's top residual directions, polar-
  orthogonalised, with all singular values set to their mean."""
  pop_lambda("iso_cts", None, dict(kw))
  if not 0.0 <= common_space_fraction <= 1.0:
    raise ValueError(f"iso_cts: common_space_fraction must be in [0, 1], got {common_space_fraction}")
  return tree_lib.merge_tree(_iso_cts_array, base, models, name="iso_cts",
                             hparams=dict(scaling_factor=float(scaling_factor),
                                          common_space_fraction=float(common_space_fraction)),
                             exclude_fn=_iso_mean_array, **common_kwargs(kw))
