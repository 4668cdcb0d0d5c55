"""nuslerp, multislerp, karcher, nearswap, sce, passthrough, arcee_fusion, ram: hand-computed
cases, properties, params trees (kernel layout), jit, bad input, and their mergekit YAML rows.

(Parity with mergekit 0.1.5 itself: tests/test_merge_oracles_extra.py.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax import merging as M
from h3jax.merging.streaming import config as mcfg
from h3jax.merging.spherical import slerp_along
from numerics import assert_close


def _arrays(seed, n=3, shape=(6, 5), scale=0.1):
  rng = np.random.default_rng(seed)
  b = rng.normal(size=shape).astype(np.float32)
  return b, [b + scale * rng.normal(size=shape).astype(np.float32) for _ in range(n)]


def _np(x):
  return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- nuslerp

def test_nuslerp_collinear_equal_weights_is_the_mean():
  a = np.array([1.0, -2.0, 3.0], np.float32)
  np.testing.assert_allclose(M.nuslerp(None, [a, 2 * a], weight=[1.0, 1.0]), 1.5 * a, rtol=1e-6)
  base = np.array([0.5, 0.5, 0.5], np.float32)  # with a base: collinear task vectors
  np.testing.assert_allclose(M.nuslerp(base, [base + a, base - 3 * a], weight=[2.0, 2.0]),
                             base - a, rtol=1e-6)


def test_nuslerp_t_from_weights_on_orthogonal_vectors():
  e1, e2 = np.array([2.0, 0.0], np.float32), np.array([0.0, 2.0], np.float32)
  out = M.nuslerp(None, [e1, e2], weight=[1.0, 3.0])  # t = 3/4 of a right angle
  np.testing.assert_allclose(out, [2 * math.cos(0.75 * math.pi / 2), 2 * math.sin(0.75 * math.pi / 2)],
                             rtol=1e-6)
  # Weights summing to ~0: t = 0.5 (mergekit).
  np.testing.assert_allclose(M.nuslerp(None, [e1, e2], weight=[1.0, -1.0]), [math.sqrt(2)] * 2, rtol=1e-6)
  assert_close(M.nuslerp(None, [e1, e2], weight=[0.0, 5.0]), e2, rtol=1e-6, atol_rel=1e-6)


def test_nuslerp_rows_and_kernel_layout():
  """Per-row angles along HF dim -1 (or 0 when row_wise); an h3jax kernel is the HF weight
  transposed, so a tree merge equals the HF-layout merge transposed."""
  rng = np.random.default_rng(0)
  hf0, hf1 = rng.normal(size=(2, 4, 3)).astype(np.float32)  # [out, in]
  for row_wise in (False, True):
    ours = M.nuslerp(None, [hf0, hf1], weight=[1.0, 2.0], nuslerp_flatten=False, nuslerp_row_wise=row_wise)
    ax = 0 if row_wise else 1
    for i in range(hf0.shape[1 - ax]):  # each vector along `ax` is its own 2-point slerp
      v0, v1 = np.take(hf0, i, axis=1 - ax), np.take(hf1, i, axis=1 - ax)
      want = slerp_along(2 / 3, v0, v1, flatten=True)
      np.testing.assert_allclose(np.take(np.asarray(ours), i, axis=1 - ax), want, rtol=2e-6, atol=1e-7)
    tree = M.nuslerp(None, [{"p": {"kernel": hf0.T}, "e": {"embedding": hf0}},
                            {"p": {"kernel": hf1.T}, "e": {"embedding": hf1}}],
                     weight=[1.0, 2.0], nuslerp_flatten=False, nuslerp_row_wise=row_wise)
    np.testing.assert_allclose(tree["p"]["kernel"], np.asarray(ours).T, rtol=1e-6)
    np.testing.assert_allclose(tree["e"]["embedding"], ours, rtol=1e-6)


def test_nuslerp_bad_input():
  a, b = np.ones(3, np.float32), np.arange(3, dtype=np.float32)
  with pytest.raises(ValueError, match="nuslerp needs a per-model `weight`"):
    M.nuslerp(None, [a, b])
  with pytest.raises(ValueError, match="at most 2 model"):
    M.nuslerp(None, [a, b, a], weight=1.0)
  with pytest.raises(ValueError, match=r"nuslerp: unknown hyper-parameter\(s\) \['lambda'\]"):
    M.nuslerp(None, [a, b], weight=1.0, **{"lambda": 0.5})
  with pytest.raises(ValueError, match=r"sce: unknown hyper-parameter\(s\) \['density'\]"):
    M.sce(a, [b], density=0.5)


# ----------------------------------------------------------------------------- multislerp

def test_multislerp_two_equal_norm_models_is_slerp():
  rng = np.random.default_rng(1)
  a = rng.normal(size=7).astype(np.float32)
  b = rng.normal(size=7).astype(np.float32)
  b *= np.linalg.norm(a) / np.linalg.norm(b)
  np.testing.assert_allclose(M.multislerp(None, [a, b], weight=[1.0, 1.0]),
                             M.nuslerp(None, [a, b], weight=[1.0, 1.0]), rtol=1e-5, atol=1e-6 * np.abs(a).max())
  base = rng.normal(size=7).astype(np.float32)  # with a base: of the task vectors
  np.testing.assert_allclose(M.multislerp(base, [base + a, base + b], weight=[3.0, 3.0]),
                             M.nuslerp(base, [base + a, base + b], weight=[1.0, 1.0]), rtol=1e-5,
                             atol=1e-6 * np.abs(base).max())


def test_multislerp_norm_is_the_weighted_mean_norm():
  b, ms = _arrays(2, n=3)
  w = np.array([1.0, 2.0, 0.5])
  out = np.asarray(M.multislerp(b, ms, weight=list(w)))
  norms = np.array([np.linalg.norm(m - b) for m in ms])
  np.testing.assert_allclose(np.linalg.norm(out - b), (w / w.sum()) @ norms, rtol=1e-5)
  out_raw = np.asarray(M.multislerp(b, ms, weight=list(w), normalize_weights=False))
  assert_close(out_raw - b, (out - b) * w.sum(), rtol=1e-4, atol_rel=1e-5)


def test_multislerp_single_model_and_antipodes():
  a = np.array([1.0, 2.0, -1.0], np.float32)
  np.testing.assert_array_equal(M.multislerp(np.zeros(3, np.float32), [a], weight=5.0), a)
  # Two antipodal vectors with equal weights: mergekit's weighted-sum fallback (here 0).
  assert_close(M.multislerp(None, [a, -a], weight=[1.0, 1.0]), np.zeros(3), rtol=0, atol=1e-7 * np.abs(a).max())
  with pytest.raises(ValueError, match="weighted sum of the unit task vectors at '<array>' is zero"):
    M.multislerp(None, [a, -a, a, -a], weight=1.0)
  with pytest.raises(ValueError, match="multislerp needs a per-model `weight`"):
    M.multislerp(None, [a, -a])


# ----------------------------------------------------------------------------- karcher

def _tangent_norm(mean_M, xs):
  """|sum_i log_mean(u_i)| on the unit sphere: 0 at a Karcher mean."""
  m = _np(mean_M).ravel() / np.linalg.norm(_np(mean_M))
  t = np.zeros_like(m)
  for x in xs:
    u = _np(x).ravel() / np.linalg.norm(_np(x))
    th = np.arccos(np.clip(u @ m, -1, 1))
    t += th / np.sin(th) * (u - (u @ m) * m)
  return np.linalg.norm(t)


def test_karcher_identical_zero_and_stationary():
  b, ms = _arrays(3, n=3, scale=0.5)
  np.testing.assert_allclose(M.karcher(None, [ms[0]] * 3), ms[0], rtol=1e-6)
  np.testing.assert_array_equal(M.karcher(None, [np.zeros(4, np.float32)] * 2), np.zeros(4))
  # A zero input is left out of the direction but counts in the mean norm.
  a = np.array([3.0, 4.0], np.float32)
  np.testing.assert_allclose(M.karcher(None, [np.zeros(2, np.float32), a]), a / 2, rtol=1e-6)
  out = M.karcher(None, ms, max_iter=50, tol=1e-7)
  assert _tangent_norm(out, ms) < 1e-4 < _tangent_norm(np.mean(ms, 0) + 0.3 * ms[0], ms)
  np.testing.assert_allclose(np.linalg.norm(out), np.mean([np.linalg.norm(m) for m in ms]), rtol=1e-5)
  # max_iter=0: the normalised mean of the unit vectors.
  u = [m / np.linalg.norm(m) for m in ms]
  m0 = np.sum(u, 0) / np.linalg.norm(np.sum(u, 0))
  np.testing.assert_allclose(M.karcher(None, ms, max_iter=0), m0 * np.mean([np.linalg.norm(m) for m in ms]),
                             rtol=1e-5, atol=1e-6 * np.abs(ms).max())


def test_karcher_base_is_one_more_input_and_jits():
  b, ms = _arrays(4, n=2, scale=0.5)
  np.testing.assert_allclose(M.karcher(b, ms), M.karcher(None, ms + [b]), rtol=1e-6)
  jitted = jax.jit(lambda base, models: M.karcher(base, models, max_iter=5))(b, ms)
  np.testing.assert_allclose(jitted, M.karcher(b, ms, max_iter=5), rtol=1e-6)
  with pytest.raises(ValueError, match="max_iter must be a non-negative integer"):
    M.karcher(b, ms, max_iter=2.5)


def test_karcher_stacked_layers_are_separate_tensors():
  rng = np.random.default_rng(5)
  ms = [{"layers": {"mlp": {"kernel": rng.normal(size=(3, 4, 5)).astype(np.float32)}}} for _ in range(3)]
  tree = M.karcher(None, ms)["layers"]["mlp"]["kernel"]
  for i in range(3):
    assert_close(tree[i], M.karcher(None, [m["layers"]["mlp"]["kernel"][i] for m in ms]), rtol=1e-5,
                 atol_rel=1e-5)  # stacked vs per tensor: other reduction order


# ----------------------------------------------------------------------------- nearswap

def test_nearswap_hand():
  base = np.zeros(4, np.float32)
  model = np.array([0.05, 1.0, -0.2, 0.0], np.float32)
  # weight = clip(t / max(|base - model|, 1e-6), 0, 1) = [1, 0.1, 0.5, 1]
  np.testing.assert_allclose(M.nearswap(base, [model], t=0.1), [0.05, 0.1, -0.1, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match="nearswap needs the distance threshold t"):
    M.nearswap(base, [model])
  with pytest.raises(ValueError, match="at most 1 model"):
    M.nearswap(base, [model, model], t=0.1)


# ----------------------------------------------------------------------------- sce

def test_sce_hand():
  base = np.zeros(4, np.float32)
  m1 = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
  m2 = np.array([-1.0, -1.0, 2.0, 0.5], np.float32)
  w1, w2 = np.mean(m1 ** 2), np.mean(m2 ** 2)
  w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
  # sum-majority signs [+, -, +, +]: m2's -1 in entry 0 is erased.
  want = [1.0, (-2 * w1 - w2) / (w1 + w2), (3 * w1 + 2 * w2) / (w1 + w2), 0.5]
  np.testing.assert_allclose(M.sce(base, [m1, m2]), want, rtol=1e-6)
  # select_topk: variances across models [2/3, 14/9, 2/9, 0]; k = floor(3 non-zero * 0.7) = 2
  # entries (1 and 0) survive the selection.
  m3 = np.array([0.0, -4.0, 3.0, 0.5], np.float32)
  out = np.asarray(M.sce(base, [m1, m2, m3], select_topk=0.7))
  np.testing.assert_array_equal(out[2:], [0.0, 0.0])
  assert np.all(out[:2] != 0)
  b, ms = _arrays(6, n=1)
  np.testing.assert_allclose(M.sce(b, ms * 3), ms[0], rtol=1e-6)
  # A layer gradient: select_topk 1 on layer 0, 0.5 on the last layer.
  b, ms = _arrays(6, n=3, shape=(2, 8))
  tree = M.sce({"layers": {"s": {"scale": b}}}, [{"layers": {"s": {"scale": m}}} for m in ms],
               select_topk=[1.0, 0.5])["layers"]["s"]["scale"]
  np.testing.assert_allclose(tree[0], M.sce(b[0], [m[0] for m in ms]), rtol=1e-6)
  np.testing.assert_allclose(tree[1], M.sce(b[1], [m[1] for m in ms], select_topk=0.5), rtol=1e-6)


def test_selection_host_and_sort_paths_agree():
  """SCE's top-k and Arcee Fusion's quantiles run in numpy on CPU, as a sort elsewhere."""
  from h3jax.merging import mergekit_extra as mx
  rng = np.random.default_rng(11)
  var = np.abs(rng.normal(size=(50, 7))).astype(np.float32)
  var[::5] = 0.0  # zero variances do not count towards k
  var[1, :3] = var[2, 0]  # a tie at one magnitude: broken by flat index on both paths
  for p in (0.05, 0.3, 0.9):
    host = jax.jit(lambda v, p=p: mx._sce_mask_host(v, p))(var)
    np.testing.assert_array_equal(host, jax.jit(lambda v, p=p: mx._sce_mask_sorted(v, p))(var))
    assert host.sum() == int(np.float32(np.count_nonzero(var)) * np.float32(p))
    assert var[host].min() >= var[~host].max()
  x = rng.normal(size=1001).astype(np.float32)
  idx = (250, 500, 750)
  np.testing.assert_array_equal(mx._quantiles_host(x, idx), np.sort(x)[list(idx)])
  np.testing.assert_array_equal(mx._quantiles_sorted(x, idx), np.sort(x)[list(idx)])


# ----------------------------------------------------------------------------- passthrough

def test_passthrough():
  a = np.array([1.0, -2.0], np.float32)
  np.testing.assert_array_equal(M.passthrough(None, [a]), a)
  np.testing.assert_allclose(M.passthrough(None, [a], scale=0.5), a / 2)
  k = np.ones((3, 2, 2), np.float32)  # a layer gradient over stacked layers
  out = M.passthrough(None, [{"layers": {"p": {"kernel": k}}}], scale=[0.0, 2.0])
  np.testing.assert_allclose(out["layers"]["p"]["kernel"][:, 0, 0], [0.0, 1.0, 2.0])
  with pytest.raises(ValueError, match="passthrough takes exactly one model and no base model"):
    M.passthrough(a, [a])
  with pytest.raises(ValueError, match="at most 1 model"):
    M.passthrough(None, [a, a])


# ----------------------------------------------------------------------------- arcee_fusion

def _arcee_reference(base, model):
  """The formula in float64 numpy over HF rows (last axis); (mask, |importance - threshold|)."""
  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p, q = softmax(_np(model)) + 1e-8, softmax(_np(base)) + 1e-8
  imp = np.abs(_np(model) - _np(base)) * np.sum(p * np.log(p / q), -1, keepdims=True)
  s = np.sort(imp.ravel())
  q1, med, q3 = (s[int(np.float32(f) * np.float32(s.size - 1))] for f in (0.25, 0.5, 0.75))
  thr = med + 1.5 * (q3 - q1)
  return imp >= thr, np.abs(imp - thr) / thr


def test_arcee_fusion_keeps_the_important_changes():
  rng = np.random.default_rng(7)
  base = rng.normal(size=(12, 10)).astype(np.float32)
  model = base + (0.05 * rng.standard_t(2, size=base.shape)).astype(np.float32)
  want, margin = _arcee_reference(base, model)
  clear = margin > 1e-3
  assert clear.mean() > 0.95 and 0 < want.sum() < want.size / 2
  out = np.asarray(M.arcee_fusion(base, [model]))
  np.testing.assert_array_equal(np.where(want, model, base)[clear], out[clear])
  # Kernels are HF weights transposed: the same merge, transposed.
  tree = M.arcee_fusion({"p": {"kernel": base.T}}, [{"p": {"kernel": model.T}}])
  np.testing.assert_array_equal(tree["p"]["kernel"], out.T)
  np.testing.assert_array_equal(M.arcee_fusion(base, [base]), base)


# ----------------------------------------------------------------------------- ram

def test_ram_and_ramplus_hand():
  base = np.zeros(3, np.float32)
  m1 = np.array([0.5, 0.0, 0.2], np.float32)
  m2 = np.array([0.3, 1e-6, 0.0], np.float32)  # 1e-6 is below epsilon: not a change
  np.testing.assert_allclose(M.ram(base, [m1, m2]), [0.4, 0.0, 0.2], rtol=1e-6)
  # RAM+: m1 has 1 shared and 1 unique change -> rho 1, clipped to alpha -> unique x (1 + r alpha).
  np.testing.assert_allclose(M.ramplus_tl(base, [m1, m2], r=0.1, alpha=0.2), [0.4, 0.0, 0.2 * 1.02],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="ram: epsilon is one value for all models"):
    M.ram(base, [m1, m2], epsilon=(1e-5, 1e-3))


def test_methods_jit_and_keep_dtype():
  b, ms = _arrays(8, n=2)
  for name, kw, n in (("nuslerp", dict(weight=[1.0, 2.0]), 2), ("multislerp", dict(weight=1.0), 2),
                      ("nearswap", dict(t=0.05), 1), ("sce", dict(select_topk=0.5), 2),
                      ("arcee_fusion", {}, 1), ("ramplus_tl", {}, 2)):
    fn = M.get_method(name)
    jitted = jax.jit(lambda x, y: fn(x, y, **kw))(b, ms[:n])
    assert_close(jitted, fn(b, ms[:n], **kw), rtol=1e-5, atol_rel=1e-6, err_msg=name)  # jit fuses: other order
  out = M.sce(jnp.asarray(b, jnp.bfloat16), [jnp.asarray(m, jnp.bfloat16) for m in ms])
  assert out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- mergekit YAML rows

def _yaml(method, n=2, base=True, **params):
  raw = dict(merge_method=method, models=[dict(model=f"/m{i}") for i in range(n)])
  if base:
    raw["base_model"] = "/base"
  if params:
    raw["parameters"] = params
  return raw


def test_yaml_base_policies_and_counts():
  spec = mcfg.from_mergekit_dict(_yaml("nuslerp", weight=1.0))
  assert spec.base_model == "/base" and spec.models == ("/m0", "/m1")
  assert mcfg.from_mergekit_dict(_yaml("multislerp", 3, base=False, weight=1.0)).base_model is None
  spec = mcfg.from_mergekit_dict(dict(_yaml("karcher", 2), models=[dict(model="/base"), dict(model="/m0")]))
  assert spec.base_model == "/base" and spec.models == ("/m0",)
  spec = mcfg.from_py_config(dict(merge_method="karcher", base_model="/base",
                                  models=[dict(model="/base"), dict(model="/m0")]))
  assert spec.base_model == "/base" and spec.models == ("/m0",)  # .py config: the base counts once
  with pytest.raises(mcfg.MergeConfigError, match="nuslerp needs exactly two models besides an optional base"):
    mcfg.from_mergekit_dict(_yaml("nuslerp", 3, weight=1.0))
  with pytest.raises(mcfg.MergeConfigError, match="nearswap needs a base_model and exactly one other model"):
    mcfg.from_mergekit_dict(_yaml("nearswap", 2, t=0.1))
  with pytest.raises(mcfg.MergeConfigError, match="passthrough merges only its listed models"):
    mcfg.from_mergekit_dict(_yaml("passthrough", 1))
  with pytest.raises(mcfg.MergeConfigError, match="passthrough needs exactly one model, got 2"):
    mcfg.from_mergekit_dict(_yaml("passthrough", 2, base=False))
  with pytest.raises(mcfg.MergeConfigError, match="sce needs a base_model"):
    mcfg.from_mergekit_dict(_yaml("sce", 2, base=False))
  with pytest.raises(mcfg.MergeConfigError, match="unknown parameter 'density' for sce"):
    mcfg.from_mergekit_dict(_yaml("sce", density=0.5))
  with pytest.raises(mcfg.MergeConfigError, match="unknown parameter 'nuslerp_flatten' for model /m0"):
    mcfg.from_mergekit_dict(dict(_yaml("nuslerp"), models=[dict(model="/m0", parameters=dict(
        nuslerp_flatten=False)), dict(model="/m1")]))


def test_yaml_through_the_driver(tmp_path):
  """Required parameters fail before writing; a .py config reaches the same functions (a scalar
  `epsilon` arrives once per model there)."""
  import merge_fixtures as mf
  from safetensors.numpy import load_file

  from h3jax.merging.streaming import merge_from_config
  base, models = mf.raw_family(tmp_path / "in", 2, seed=9)
  cfg = tmp_path / "m.yaml"
  cfg.write_text(f"merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {models[0]}\n")
  with pytest.raises(mcfg.MergeConfigError, match="missing required parameter 't'"):
    merge_from_config(str(cfg), str(tmp_path / "out"), progress=False)
  assert not (tmp_path / "out").exists()
  py = tmp_path / "m.py"
  py.write_text("def get_config():\n"
                f"  return dict(merge_method='ram', base_model={base!r}, "
                f"models=[dict(model=m) for m in {models!r}], parameters=dict(epsilon=0.03))\n")
  merge_from_config(str(py), str(tmp_path / "out"), progress=False)
  got = mf.read_tensors(tmp_path / "out")
  b, ms = load_file(base), [load_file(m) for m in models]
  want = M.ram(b, ms, epsilon=0.03)
  for k in b:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("name,hp", [("tsv_m", {}), ("resm", dict(rank_mode="sparsity", outlier_mode="sv")),
                                     ("iso_cts", {}), ("ties", dict(density=0.5))])
def test_stacked_layers_on_cpu_merge_one_layer_at_a_time_as_vmapped(name, hp, monkeypatch):
  """On CPU stacked layers are merged in a loop (batched LAPACK deadlocked jaxlib 0.10.2's pool); the
  result equals the vmapped path's, which the other backends take."""
  from h3jax.merging import tree
  rs = np.random.RandomState(0)
  base = {"layers": {"mlp": {"up_proj": {"kernel": jnp.asarray(rs.randn(3, 24, 40), jnp.float32)}}}}
  models = [jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rs.randn(*x.shape), jnp.float32), base) for _ in range(3)]
  models[1]["layers"]["mlp"]["up_proj"]["kernel"] = models[1]["layers"]["mlp"]["up_proj"]["kernel"].at[1].set(
      base["layers"]["mlp"]["up_proj"]["kernel"][1])  # a zero task vector on one layer
  method = M.get_method(name)
  looped = method(base, models, **hp)
  monkeypatch.setattr(tree.jax, "default_backend", lambda: "gpu")
  vmapped = method(base, models, **hp)
  a, b = (np.asarray(x["layers"]["mlp"]["up_proj"]["kernel"]) for x in (looped, vmapped))
  assert np.isfinite(a).all()
  assert_close(a, b, rtol=1e-5, atol_rel=1e-5)
