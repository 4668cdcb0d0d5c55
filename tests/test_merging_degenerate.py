"""Every merge method on degenerate task vectors: all zero, some experts zero,
rank-deficient, linearly dependent (antipodal), identical, tiny (1e-9 relative; ~1e-20 absolute,
whose squares underflow float32), bf16 inputs.

Asserted: finite outputs for every method; all-zero task vectors give the base; every `solver`
of TSV-M / RESM agrees with solver='svd'; TSV-M with zero task vectors equals a float64 numpy
reference in which a zero task vector contributes nothing (docs/merging.md), and identical
experts give theta_0 + alpha * (rank-floor(r/T) truncation of tau).
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h3jax import merging as M
from h3jax.merging import blocks
from h3jax.merging import svd as svd_lib

# Shapes, dtypes and model counts are few and fixed: each distinct one compiles every kernel anew.
PROPS = settings(max_examples=8, deadline=None, derandomize=True)
FAMILIES = ("all_zero", "some_zero", "rank_deficient", "antipodal", "identical", "tiny_one",
            "tiny_all", "bf16")  # bf16 last
# Tall, wide and square tensors: tall stacks take polar's Gram route (M >= 2K), (72, 56)
# top_singular's Rayleigh-Ritz route (solver='gram', k + 32 < r).
SHAPES = ((40, 12), (12, 40), (72, 56))


def family(kind, seed, shape=(12, 8), n=3):
  """(base, [models]) in float32 (bfloat16 for 'bf16') with degenerate task vectors."""
  rng = np.random.default_rng(seed)
  base = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  taus = [0.02 * (1 + i) * rng.standard_normal(shape) for i in range(n)]
  if kind == "all_zero":
    taus = [0 * t for t in taus]
  elif kind == "some_zero":
    zero = rng.permutation(n)[:rng.integers(1, n)]  # 1 .. n-1 experts unchanged
    taus = [0 * t if i in zero else t for i, t in enumerate(taus)]
  elif kind == "rank_deficient":  # LoRA-like: rank 1 or 2, below floor(r / T)
    ranks = rng.integers(1, 3, n)
    taus = [0.1 * rng.standard_normal((shape[0], r)) @ rng.standard_normal((r, shape[1])) for r in ranks]
  elif kind == "antipodal":  # tau_1 = -tau_0 (a rank-deficient stack), tau_2 = 2 tau_0
    taus = [taus[0], -taus[0], 2 * taus[0]][:n]
  elif kind == "identical":
    taus = [taus[0]] * n
  elif kind in ("tiny_one", "tiny_all"):  # base 0: the task vectors are exactly these
    base = np.zeros(shape, np.float32)
    scale = [1e-9] + [1.0] * (n - 1) if kind == "tiny_one" else [1e-18] * n
    taus = [s * t for s, t in zip(scale, taus)]
  models = [(base + t).astype(np.float32) for t in taus]
  if kind == "bf16":
    import ml_dtypes
    models = [m.astype(ml_dtypes.bfloat16) for m in models]
    base = base.astype(ml_dtypes.bfloat16)
    models[0] = base.copy()  # one expert unchanged in bf16 (a zero task vector)
  return base, models


def _f32(x):
  return np.asarray(x, np.float32)


def call_every_method(base, models):
  """{name: merged array} for every method in `M.METHODS` (those with fixed arity get a prefix
  of `models`; fisher / regmean get positive statistics)."""
  n = len(models)
  out = {}
  for name, fn in M.METHODS.items():
    if name == "slerp":
      out[name] = fn(base, models[:1], t=0.3)
    elif name == "nearswap":
      out[name] = fn(base, models[:1], t=0.5)
    elif name == "arcee_fusion":
      out[name] = fn(base, models[:1])
    elif name == "passthrough":
      out[name] = fn(None, models[:1])
    elif name in ("nuslerp", "multislerp"):
      out[name] = fn(base, models[:2], weight=[1.0, 0.6])
    elif name == "fisher":
      out[name] = fn(None, models, fishers=[np.ones(base.shape, np.float32) * (1 + i) for i in range(n)])
    elif name == "regmean":
      g = np.eye(base.shape[0], dtype=np.float32)
      out[name] = fn(None, [{"w": m} for m in models], grams=[{"w": (1 + i) * g} for i in range(n)])["w"]
    elif name == "emr":
      for i, m in enumerate(fn(base, models)):
        out[f"emr[{i}]"] = m
    elif name in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                  "della_linear", "consensus_ties"):
      out[name] = fn(base, models, density=0.5, **({"seed": 0} if "da" in name or "della" in name else {}))
    else:
      out[name] = fn(base, models)
  out["ties_fusion_bench"] = M.ties(base, models, mode="fusion_bench", density=0.3)
  out["tsv_m_rank_cap"] = M.tsv_m(base, models, rank_cap="numerical")
  out["resm_sparsity_sv"] = M.resm(base, models, rank_mode="sparsity", outlier_mode="sv")
  out["resm_param"] = M.resm(base, models, outlier_mode="param")
  out["iso_cts_0.5"] = M.iso_cts(base, models, common_space_fraction=0.5)
  return out


# The two tests over every family take each family once (a fixed seed each), not hypothesis draws: 8
# derandomized draws of (family, seed, shape) left out the rank-deficient and antipodal families in both.
@pytest.mark.parametrize("kind", FAMILIES[:-1])
def test_every_method_is_finite_on_degenerate_task_vectors(kind):
  base, models = family(kind, FAMILIES.index(kind))
  for name, merged in call_every_method(base, models).items():
    merged = _f32(merged)
    assert np.isfinite(merged).all(), f"{name} on {kind}: non-finite output"
    if kind == "all_zero":  # every model equals the base: every method returns it
      np.testing.assert_allclose(merged, _f32(base), rtol=1e-5, atol=1e-7, err_msg=f"{name} on {kind}")


def _svd_family_calls(base, models, solver):
  # resm's defaults run tsv_m's code path; 'param' outliers only reshape tau before the same SVDs.
  return {
      "tsv_m": M.tsv_m(base, models, solver=solver),
      "tsv_m_rank_cap": M.tsv_m(base, models, rank_cap="numerical", solver=solver),
      "resm_sparsity_sv": M.resm(base, models, rank_mode="sparsity", outlier_mode="sv", solver=solver),
  }


@pytest.mark.parametrize("kind,shape", [(k, SHAPES[i % len(SHAPES)]) for i, k in enumerate(FAMILIES)])
def test_every_solver_agrees_with_svd_on_degenerate_task_vectors(kind, shape):
  """Every family once, the shapes in turn (each (shape, dtype) compiles its kernels once)."""
  base, models = family(kind, 11 * FAMILIES.index(kind), shape=shape)
  ref = {k: _f32(v) for k, v in _svd_family_calls(base, models, "svd").items()}
  b = _f32(base)
  for solver in ("auto", "gram"):
    for name, out in _svd_family_calls(base, models, solver).items():
      out = _f32(out)
      assert np.isfinite(out).all(), f"{name} solver={solver} on {kind}: non-finite"
      d_ref, d_out = ref[name] - b, out - b
      scale = max(np.linalg.norm(d_ref), np.linalg.norm(d_out))
      # bf16 outputs round the merged weights: allow a few bf16 ulps of the weights.
      atol = 1e-6 * max(np.linalg.norm(_f32(m) - b) for m in models)  # deltas that cancel to ~0
      if kind == "bf16":
        atol += 4 * 2.0 ** -8 * np.linalg.norm(b)
      err = np.linalg.norm(d_out - d_ref)
      assert err <= 1e-3 * scale + atol, \
          f"{name} solver={solver} on {kind} {shape}: |diff| {err:.3g} vs |delta| {scale:.3g}"


# ----------------------------------------------------------------------------- hand references

def tsv_reference(base, models, alpha=1.0, zero="drop"):
  """TSV-M in float64 numpy (FusionBench's algorithm). zero='drop': a zero task vector adds no
  triples (h3jax); zero='identity': it adds the columns e_1..e_k with s = 0 (what LAPACK's SVD of
  a zero matrix returns, so fusion-bench's torch.linalg.svd)."""
  taus = [np.asarray(m, np.float64) - np.asarray(base, np.float64) for m in models]
  m_, n_ = taus[0].shape
  k = min(m_, n_) // len(taus)
  us, ss, vs = [], [], []
  for t in taus:
    if not t.any():
      eye_u, eye_v = np.eye(m_)[:, :k], np.eye(n_)[:, :k]
      keep = 0.0 if zero == "drop" else 1.0
      us.append(keep * eye_u), ss.append(np.zeros(k)), vs.append(keep * eye_v)
      continue
    u, s, vt = np.linalg.svd(t, full_matrices=False)
    us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)

  def polar(x):  # partial isometry: numerically zero singular values dropped
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u * (s > blocks.POLAR_RANK_RTOL * s[0])) @ vt if s[0] > 0 else 0 * x

  u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
  return np.asarray(base, np.float64) + alpha * (polar(u) * s) @ polar(v).T


@PROPS
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), solver=st.sampled_from(svd_lib.SOLVERS))
def test_tsv_m_zero_task_vector_contributes_nothing(seed, shape, solver):
  base, models = family("some_zero", seed, shape=shape)
  out = np.asarray(M.tsv_m(base, models, solver=solver), np.float64)
  ref = tsv_reference(base, models)
  err = np.linalg.norm(out - ref) / np.linalg.norm(ref - base)
  assert err <= 1e-4, f"tsv_m({solver}) vs float64 reference with zero tasks dropped: {err:.3g}"


@PROPS
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(SHAPES), solver=st.sampled_from(svd_lib.SOLVERS))
def test_tsv_m_identical_experts_give_the_truncated_task_vector(seed, shape, solver):
  base, models = family("identical", seed, shape=shape)
  tau = np.asarray(models[0], np.float64) - base
  u, s, vt = np.linalg.svd(tau, full_matrices=False)
  k = min(shape) // len(models)
  ref = base + (u[:, :k] * s[:k]) @ vt[:k]
  out = np.asarray(M.tsv_m(base, models, solver=solver), np.float64)
  assert np.linalg.norm(out - ref) <= 1e-4 * np.linalg.norm(ref - base)


@pytest.mark.parametrize("solver", svd_lib.SOLVERS)
def test_tsv_m_antipodal_experts_cancel(solver):
  """tau, -tau: the stacks [U, -U] / [V, V] are rank-deficient; the partial-isometry polar factor
  gives (U s V^T - U s V^T) / 2 = 0."""
  base, (m0, m1, _) = family("antipodal", 3, shape=(40, 12))
  out = np.asarray(M.tsv_m(base, [m0, m1], solver=solver), np.float64)
  assert np.linalg.norm(out - base) <= 1e-5 * np.linalg.norm(np.asarray(m0, np.float64) - base)


def test_bf16_inputs_every_method_finite_and_zero_expert_dropped():
  """bf16 experts, one of them unchanged (a zero task vector after the bf16 -> f32 cast)."""
  base, models = family("bf16", 7)
  outs = call_every_method(base, models)
  for name, merged in outs.items():
    assert np.isfinite(_f32(merged)).all(), f"{name} on bf16: non-finite output"
  assert outs["tsv_m"].dtype == base.dtype
  ref = tsv_reference(_f32(base), [_f32(m) for m in models])
  err = np.linalg.norm(_f32(outs["tsv_m"]) - ref) / np.linalg.norm(ref - _f32(base))
  assert err <= 2e-2, f"bf16 tsv_m vs float64 reference (zero task dropped): {err:.3g}"


def test_gram_routes_fall_back_instead_of_dividing_by_zero():
  """The eigh fast paths see a zero / tiny / rank-one input and take the SVD (or scale first)."""
  z = np.zeros((40, 12), np.float32)
  u, s, v = svd_lib.top_k_triples(z, 4, "auto")
  assert np.isfinite(np.asarray(u)).all() and not np.asarray(s).any()
  tiny = 1e-25 * np.random.default_rng(0).standard_normal((40, 12)).astype(np.float32)
  u, s, v = svd_lib.top_k_triples(tiny, 4, "auto")  # squares (1e-50) underflow: scaled first
  ref = np.linalg.svd(tiny.astype(np.float64), compute_uv=False)[:4]
  np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-4)
  u, s, v = svd_lib.top_singular(z, 4)
  assert np.isfinite(np.asarray(u)).all() and not np.asarray(s).any()
  np.testing.assert_array_equal(np.asarray(blocks.polar(z)), z)
  x = np.concatenate([np.eye(40, 6), np.zeros((40, 6))], 1).astype(np.float32)  # [A | 0]
  np.testing.assert_allclose(np.asarray(blocks.polar(x)), x, atol=1e-6)


def _decomposition_primitives(jaxpr, skip_conds: bool = False) -> set:
  """Names of the SVD / eigh / QR primitives anywhere in a (closed) jaxpr, sub-jaxprs included
  (`skip_conds`: except inside the jaxpr's own top-level conds)."""
  found = set()
  for eqn in jaxpr.eqns:
    if skip_conds and eqn.primitive.name == "cond":
      continue
    if eqn.primitive.name in ("svd", "eigh", "eig", "qr", "householder_product", "geqrf"):
      found.add(eqn.primitive.name)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        if hasattr(sub, "jaxpr"):
          found |= _decomposition_primitives(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub)
  return found


@pytest.mark.parametrize("method", ["auto", "svd"])
def test_zero_task_vector_takes_no_decomposition(method):
  """tau = 0 (the attention and embedding tensors of LoRA-on-FFN experts) gives zero triples from the
  branch of a `cond` that holds no SVD / eigh; TSV-M of all-zero task vectors returns the base exactly."""
  import jax
  closed = jax.make_jaxpr(lambda t: svd_lib.top_k_triples(t, 4, method))(np.zeros((40, 12), np.float32))
  conds = [e for e in closed.jaxpr.eqns if e.primitive.name == "cond"]
  assert conds, "top_k_triples has no cond around its decomposition"
  branches = conds[-1].params["branches"]  # (false: tau = 0, true: decompose)
  assert _decomposition_primitives(branches[0].jaxpr) == set()
  assert _decomposition_primitives(branches[1].jaxpr) >= {"svd"}
  u, s, v = svd_lib.top_k_triples(np.zeros((40, 12), np.float32), 4, method)
  assert not np.asarray(u).any() and not np.asarray(s).any() and not np.asarray(v).any()
  # solver "gram": no decomposition outside the cond either (its Gram eigh sits in the tau != 0 branch)
  closed = jax.make_jaxpr(lambda t: svd_lib.top_singular(t, 4))(np.zeros((40, 12), np.float32))
  assert _decomposition_primitives(closed.jaxpr, skip_conds=True) == set()  # nested jits included
  u, s, v = svd_lib.top_singular(np.zeros((40, 12), np.float32), 4)
  assert not np.asarray(u).any() and not np.asarray(s).any() and not np.asarray(v).any()
  base, models = family("all_zero", 3, shape=(40, 12))
  for solver in ("auto", "svd", "gram"):
    out = np.asarray(svd_lib._tsvm_array(np.asarray(base), np.stack(models), None, solver=solver))
    np.testing.assert_array_equal(out, base)
  # one zero task among non-zero ones: the same merge as before the skip (a float64 reference in
  # which the zero task adds no triples, as in test_tsv_m_zero_task_vector_contributes_nothing)
  base, models = family("some_zero", 5, shape=(40, 12))
  ref = tsv_reference(base, models)
  out = _f32(M.tsv_m(base, models, solver=method))
  assert np.linalg.norm(out - ref) <= 1e-4 * np.linalg.norm(ref - base)


@pytest.mark.parametrize("mode", ["mergekit", "fusion_bench"])
def test_ties_propagates_a_nan_input_instead_of_writing_the_base(mode):
  base, models = family("some_zero", 1)
  models = [m.copy() for m in models]
  models[2][3, 4] = np.nan
  scope = "tensor" if mode == "fusion_bench" else None
  out = np.asarray(M.ties(base, models, density=0.5, mode=mode, trim_scope=scope))
  assert np.isnan(out[3, 4]) and np.isfinite(np.delete(out.ravel(), 3 * out.shape[1] + 4)).all()
