"""Merge methods: hand-computed cases, trees/jit/dtypes, bad input (properties: test_merging_properties.py).

(Oracle parity with mergekit / fusion-bench lives in the driver's oracle tests.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from h3jax import merging as M
from h3jax.config import ModelConfig
from h3jax.merging import blocks
from h3jax.model.params import init_params
from numerics import assert_close, assert_tree_close

# Few distinct leaf shapes keep the number of compilations (and the runtime) small.
CFG = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                  num_kv_heads=2, head_dim=4)


def _arrays(seed, n=3, shape=(6, 5), scale=0.1):
  rng = np.random.default_rng(seed)
  b = rng.normal(size=shape).astype(np.float32)
  return b, [b + scale * rng.normal(size=shape).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def trees():
  base = init_params(CFG, jax.random.key(0))
  models = [jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(10 + i), x.shape),
                         base) for i in range(3)]
  return base, models


# ----------------------------------------------------------------------------- hand-computed cases

def test_linear_and_task_arithmetic_hand():
  a, b = np.array([1.0, 2.0]), np.array([3.0, 6.0])
  np.testing.assert_allclose(M.linear(None, [a, b], weight=[1.0, 3.0]), [2.5, 5.0])
  np.testing.assert_allclose(M.linear(None, [a, b], weight=[1.0, 3.0], normalize=False), [10.0, 20.0])
  base = np.array([1.0, 1.0])
  np.testing.assert_allclose(M.task_arithmetic(base, [a, b], weight=[1.0, 0.5], lambda_=2.0),
                             base + 2 * (np.array([0, 1.0]) + 0.5 * np.array([2.0, 5.0])))
  np.testing.assert_allclose(M.task_arithmetic(base, [a, b], **{"lambda": 0.0}), base)


def test_ties_mergekit_hand():
  base = np.zeros(4, np.float32)
  m1 = np.array([4.0, -1.0, 0.5, 2.0], np.float32)
  m2 = np.array([-3.0, -2.0, 1.0, 0.1], np.float32)
  # density .5 -> k=2: trimmed m1 = [4, 0, 0, 2], m2 = [-3, -2, 0, 0]; signs (sum>=0) [+, -, +, +].
  out = M.ties(base, [m1, m2], density=0.5)
  np.testing.assert_allclose(out, [4.0, -2.0, 0.0, 2.0])
  out = M.ties(base, [m1, m2], density=0.5, weight=[1.0, 2.0], normalize=False)
  # weighted deltas vote: [4, 0, 0, 2] + [-6, -4, 0, 0] -> signs [-, -, +, +]; disjoint sum.
  np.testing.assert_allclose(out, [-6.0, -4.0, 0.0, 2.0])


def test_ties_fusion_bench_hand():
  base = np.zeros(4, np.float32)
  m1 = np.array([4.0, -1.0, 0.5, 2.0], np.float32)
  m2 = np.array([-3.0, -2.0, 1.0, 0.9], np.float32)
  # keep |tau| >= 2nd smallest |tau| (ties kept): m1 [4, -1, 0, 2], m2 [-3, -2, 1, 0];
  # sign(sum) = [+, -, +, +]; disjoint sum [4, -3, 1, 2], max [4, -2, 1, 2].
  np.testing.assert_allclose(M.ties(base, [m1, m2], density=0.5, mode="fusion_bench"),
                             [4.0, -3.0, 1.0, 2.0])
  np.testing.assert_allclose(M.ties(base, [m1, m2], density=0.5, mode="fusion_bench", lambda_=0.3,
                                    merge_func="max"), [1.2, -0.6, 0.3, 0.6], rtol=1e-6)
  np.testing.assert_allclose(M.ties(base, [m1, m2], density=0.5, mode="fusion_bench",
                                    merge_func="mean"), [4.0, -1.5, 1.0, 2.0])


def test_ties_global_trim_over_the_whole_tree():
  base = {"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}
  m = {"a": np.array([1.0, 2.0, 3.0, 4.0], np.float32), "b": np.array([5.0, 0.5], np.float32)}
  # FusionBench keeps |tau| >= the (n - int(n*density))-th smallest over the whole model:
  # n=6 -> 3rd smallest = 2 (so int(n*d) + 1 values survive).
  out = M.ties(base, [m], density=0.5, mode="fusion_bench")
  np.testing.assert_allclose(out["a"], [0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(out["b"], [5.0, 0])
  assert M.global_thresholds(base, [m], 0.5) == (2.0,)
  out = M.ties(base, [m], density=0.5, mode="fusion_bench", trim_scope="tensor")
  np.testing.assert_allclose(out["a"], [0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(out["b"], [5.0, 0.5])


def test_dare_mask_recovery_and_rescaling():
  base, (m,) = _arrays(1, n=1, shape=(64, 64))
  tau = m - base
  out = np.asarray(M.dare_linear(base, [m], density=0.3, mode="paper", seed=7)) - base
  kept = out != 0
  assert abs(kept.mean() - 0.3) < 0.03
  np.testing.assert_allclose(out[kept], tau[kept] / 0.3, rtol=1e-5, atol=1e-6)
  out = np.asarray(M.dare_linear(base, [m], density=0.3, seed=7)) - base  # mergekit: L1 match
  np.testing.assert_array_equal(out != 0, kept)  # same seed -> same mask
  scale = np.abs(tau).sum() / np.abs(tau[kept]).sum()
  np.testing.assert_allclose(out[kept], tau[kept] * scale, rtol=1e-4, atol=1e-6)
  other = np.asarray(M.dare_linear(base, [m], density=0.3, seed=8)) - base
  assert ((other != 0) != kept).any()


def test_della_mask_recovery_monotone_keep_rate():
  base, (m,) = _arrays(2, n=1, shape=(400, 32))
  tau = m - base
  out = np.asarray(M.della_linear(base, [m], density=0.5, epsilon=0.3, mode="paper", seed=1)) - base
  kept = out != 0
  p = np.asarray(blocks.della_keep_probs(tau, 0.5, 0.3, axis=1))
  np.testing.assert_allclose(out[kept], tau[kept] / p[kept], rtol=1e-5, atol=1e-6)
  rank = np.argsort(np.argsort(np.abs(tau), axis=1), axis=1)
  rate = [kept[rank == r].mean() for r in (0, 15, 31)]
  assert rate[0] < rate[1] < rate[2]
  assert abs(rate[0] - 0.2) < 0.07 and abs(rate[2] - 0.8) < 0.07


def test_breadcrumbs_hand():
  base = np.zeros(10, np.float32)
  m = np.arange(1.0, 11.0, dtype=np.float32)
  np.testing.assert_allclose(M.breadcrumbs(base, [m], density=0.5, gamma=0.2),
                             [0, 0, 0, 4, 5, 6, 7, 8, 0, 0])


def test_slerp_hand():
  a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
  np.testing.assert_allclose(M.slerp(a, [b], t=0.5), [math.sqrt(0.5)] * 2, rtol=1e-6)
  np.testing.assert_allclose(M.slerp(a, [2 * a], t=0.25), 1.25 * a)  # collinear: lerp
  np.testing.assert_allclose(M.slerp(a, [-a], t=0.25), 0.5 * a)  # antipodal: lerp
  # zero-norm base: not normalised, dot = 0 -> quarter-turn weights (as mergekit).
  np.testing.assert_allclose(M.slerp(np.zeros(2), [b], t=0.5), math.sqrt(0.5) * b, rtol=1e-6)


def test_model_stock_hand():
  base = np.zeros(2, np.float32)
  m1, m2 = np.array([1.0, 0.0]), np.array([1.0, 1.0])
  c = 1 / math.sqrt(2)
  t = 2 * c / (1 + c)
  np.testing.assert_allclose(M.model_stock(base, [m1, m2]), t * (m1 + m2) / 2, rtol=1e-6)
  np.testing.assert_allclose(M.model_stock(base, [m1, m2], angle_avg="deg"), t * (m1 + m2) / 2, rtol=1e-6)
  m3 = np.array([0.0, 1.0])  # N = 3: cos average differs from angle average
  a = M.model_stock(base, [m1, m2, m3])
  b = M.model_stock(base, [m1, m2, m3], angle_avg="deg")
  cos_mean = (c + 0 + c) / 3
  np.testing.assert_allclose(a, 3 * cos_mean / (1 + 2 * cos_mean) * (m1 + m2 + m3) / 3, rtol=1e-6)
  assert not np.allclose(a, b)


def test_consensus_ta_hand():
  base = np.zeros(3, np.float32)
  m1, m2, m3 = np.array([1.5, 1.0, 0.1]), np.array([1.0, -3.0, 2.0]), np.array([1.2, -2.5, 0.05])
  # merged = [3.7, -4.5, 2.15]; strict |tau_t| > |merged - tau_t|: m1 [F, F, F], m2 [F, T, T],
  # m3 [F, T, F] -> agreeing counts [0, 2, 1].
  np.testing.assert_allclose(M.consensus_ta(base, [m1, m2, m3]), [0.0, -4.5, 2.15], rtol=1e-6)
  np.testing.assert_allclose(M.consensus_ta(base, [m1, m2, m3], k=2), [0.0, -4.5, 0.0], rtol=1e-6)
  # Weights change the merged delta but not the (raw) task vectors the masks compare.
  np.testing.assert_allclose(M.consensus_ta(base, [m1, m2, m3], weight=[1.0, 1.0, 0.0], k=2),
                             [0.0, -2.0, 0.0], rtol=1e-6)


def test_tsv_m_hand_orthogonal_tasks_and_single_task():
  e = np.eye(4, dtype=np.float32)
  base = np.ones((4, 4), np.float32)
  t1 = 3 * np.outer(e[0], e[1]) + 1 * np.outer(e[1], e[0])
  t2 = 2 * np.outer(e[2], e[3]) + 0.5 * np.outer(e[3], e[2])
  # k = 4 / 2 = 2 per task; the concatenated factors are already orthonormal -> Delta = t1 + t2.
  assert_close(M.tsv_m(base, [base + t1, base + t2]), base + t1 + t2, rtol=1e-5, atol_rel=1e-5)
  assert_close(M.tsv_m(base, [base + t1, base + t2], alpha=0.5), base + 0.5 * (t1 + t2), rtol=1e-5,
               atol_rel=1e-5)
  b, (m,) = _arrays(3, n=1)
  assert_close(M.tsv_m(b, [m]), m, rtol=1e-5, atol_rel=1e-5)
  b1, ms1 = _arrays(4, shape=(5,))
  np.testing.assert_allclose(M.tsv_m(b1, ms1, alpha=2.0), b1 + 2 * np.mean(np.stack(ms1) - b1, 0),
                             rtol=1e-6)


def test_iso_c_single_task_and_iso_cts_sizes():
  b, (m,) = _arrays(5, n=1)
  u, s, vt = np.linalg.svd(m - b, full_matrices=False)
  assert_close(M.iso_c(b, [m]), b + s.mean() * u @ vt, rtol=1e-5, atol_rel=1e-5)
  assert M.svd.iso_cts_sizes((10, 7), 3, 0.8) == (4, 1)
  assert M.svd.iso_cts_sizes((64, 48), 3, 0.8) == (39, 3)
  out = M.iso_cts(b, _arrays(5)[1])
  assert out.shape == b.shape and np.isfinite(np.asarray(out)).all()


def test_emr_hand():
  base = np.zeros(2, np.float32)
  m1, m2 = np.array([1.0, -2.0], np.float32), np.array([3.0, 1.0], np.float32)
  parts = M.emr(base, [m1, m2], return_parts=True)
  np.testing.assert_allclose(parts["unified"], [3.0, -2.0])
  np.testing.assert_array_equal(parts["masks"][0], [True, True])
  np.testing.assert_array_equal(parts["masks"][1], [True, False])
  np.testing.assert_allclose(parts["rescalers"], [1.5 / 2.5, 2.0 / 1.5], rtol=1e-6)
  t1, t2 = M.emr(base, [m1, m2])
  np.testing.assert_allclose(t1, 0.6 * np.array([3.0, -2.0]), rtol=1e-6)
  np.testing.assert_allclose(t2, 4 / 3 * np.array([3.0, 0.0]), rtol=1e-6)


# ----------------------------------------------------------------------------- trees, jit, dtypes

ALL_KW = {
    "linear": {}, "task_arithmetic": {}, "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5},
    "della": {"density": 0.5}, "della_linear": {"density": 0.5}, "slerp": {"t": 0.3},
    "model_stock": {}, "consensus_ta": {}, "consensus_ties": {"density": 0.5}, "tsv_m": {},
    "iso_c": {}, "iso_cts": {}, "resm": {},
    # mergekit 0.1.5's extra methods (their own cases: test_merging_methods_extra.py)
    "nuslerp": {"weight": [1.0, 2.0]}, "multislerp": {"weight": [1.0, 1.0, 2.0]}, "karcher": {},
    "nearswap": {"t": 0.5}, "sce": {"select_topk": 0.5}, "passthrough": {}, "arcee_fusion": {},
    "ram": {}, "ramplus_tl": {},
}
# How many of the three models each method takes (default all).
N_MODELS = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "nuslerp": 2}


def test_every_transform_jits_and_keeps_structure_and_dtypes():
  # A small tree with a stacked 2-D leaf, a stacked 1-D leaf and a plain 2-D leaf.
  shapes = {"embed": {"embedding": (8, 4)}, "layers": {"attn_norm": {"scale": (2, 4)},
                                                      "mlp": {"up_proj": {"kernel": (2, 4, 6)}}}}
  is_shape = lambda x: isinstance(x, tuple)
  base = jax.tree.map(lambda s: jnp.ones(s, jnp.bfloat16), shapes, is_leaf=is_shape)
  models = [jax.tree.map(lambda s, i=i: (1 + 0.1 * jax.random.normal(jax.random.key(i), s)).astype(jnp.bfloat16),
                         shapes, is_leaf=is_shape) for i in range(3)]
  assert set(ALL_KW) | {"emr", "fisher", "regmean"} == set(M.METHODS)
  fishers = [jax.tree.map(jnp.abs, m) for m in models]
  grams = [{"embed/embedding": jnp.eye(8)}] * 3
  calls = {name: (lambda b, m, f=M.get_method(name), kw=kw, n=N_MODELS.get(name, 3): f(b, m[:n], **kw))
           for name, kw in ALL_KW.items()}
  calls["passthrough"] = lambda b, m: M.passthrough(None, m[:1])
  calls["emr"] = lambda b, m: M.emr(b, m)[1]
  calls["fisher"] = lambda b, m: M.fisher(None, m, fishers=fishers)
  calls["regmean"] = lambda b, m: M.regmean(None, m, grams=grams)
  for name, call in calls.items():
    # Tracing with abstract values proves jittability and gives structure and dtypes
    # without paying an XLA compilation per method.
    out = jax.eval_shape(call, base, models)
    assert jax.tree.structure(out) == jax.tree.structure(base), name
    assert all(o.dtype == jnp.bfloat16 and o.shape == b.shape
               for o, b in zip(jax.tree.leaves(out), jax.tree.leaves(base))), name
  for name in ("ties",):  # compiled under an outer jit == eager (compiling all would be slow)
    jax.tree.map(lambda a, r: np.testing.assert_allclose(np.float32(a), np.float32(r), rtol=1e-2, atol=1e-2),
                 jax.jit(calls[name])(base, models), calls[name](base, models))


def test_stacked_layers_are_merged_per_tensor(trees):
  base, models = trees
  out = M.ties(base, models, density=0.3)
  k = "layers/mlp/up_proj/kernel"
  for i in range(CFG.num_layers):
    per = M.ties(base["layers"]["mlp"]["up_proj"]["kernel"][i],
                 [m["layers"]["mlp"]["up_proj"]["kernel"][i] for m in models], density=0.3)
    np.testing.assert_allclose(out["layers"]["mlp"]["up_proj"]["kernel"][i], per, err_msg=k)
  out = M.tsv_m(base, models)
  per = M.tsv_m(base["layers"]["attn"]["o_proj"]["kernel"][1],
                [m["layers"]["attn"]["o_proj"]["kernel"][1] for m in models])
  assert_close(out["layers"]["attn"]["o_proj"]["kernel"][1], per, rtol=1e-5, atol_rel=1e-5)


def test_layer_gradients_and_rules(trees):
  base, models = trees
  out = M.slerp(base, models[:1], t=[0.0, 1.0])
  q = lambda t: t["layers"]["attn"]["q_proj"]["kernel"]
  assert_close(q(out)[0], q(base)[0], rtol=1e-6, atol_rel=1e-6)
  assert_close(q(out)[1], q(models[0])[1], rtol=1e-6, atol_rel=1e-6)
  assert_close(out["embed"]["embedding"], base["embed"]["embedding"], rtol=1e-6, atol_rel=1e-6)  # t=0
  rules = M.rules.keep_embeddings_rules() + (("layers/mlp/*", {"density": 1.0}),)
  out = M.ties(base, models, density=0.2, rules=rules)
  np.testing.assert_array_equal(out["embed"]["embedding"], base["embed"]["embedding"])
  np.testing.assert_array_equal(out["lm_head"]["kernel"], base["lm_head"]["kernel"])
  np.testing.assert_allclose(out["layers"]["mlp"]["down_proj"]["kernel"],
                             M.ties(base, models, density=1.0)["layers"]["mlp"]["down_proj"]["kernel"])
  out = M.tsv_m(base, models, rules=[("lm_head/*", {"exclude": True})])
  np.testing.assert_allclose(out["lm_head"]["kernel"],
                             np.mean([m["lm_head"]["kernel"] for m in models], 0), rtol=1e-5,
                             atol=1e-6 * np.abs(models[0]["lm_head"]["kernel"]).max())
  w = M.task_arithmetic(base, models, weight=[[0.0, 1.0], 0.0, 0.0])  # per-model gradient
  np.testing.assert_allclose(q(w)[0], q(base)[0])
  assert_close(q(w)[1], q(models[0])[1], rtol=1e-6, atol_rel=1e-6)


def test_lora_leaves_are_folded_before_merging():
  base = {"kernel": np.zeros((4, 3), np.float32)}
  a, b = np.ones((4, 2), np.float32), np.full((2, 3), 0.5, np.float32)
  m = {"kernel": np.zeros((4, 3), np.float32), "lora_a": a, "lora_b": b}
  out = M.task_arithmetic(base, [m], lora_scale=2.0)
  np.testing.assert_allclose(out["kernel"], 2.0 * a @ b)


def test_randomised_methods_are_reproducible(trees):
  base, models = trees
  x = M.dare_ties(base, models, density=0.5, seed=3)
  y = M.dare_ties(base, models, density=0.5, seed=3)
  z = M.dare_ties(base, models, density=0.5, seed=4)
  jax.tree.map(np.testing.assert_array_equal, x, y)
  assert not np.array_equal(x["layers"]["mlp"]["up_proj"]["kernel"], z["layers"]["mlp"]["up_proj"]["kernel"])


# ----------------------------------------------------------------------------- bad input

def test_bad_input_errors(trees):
  base, models = trees
  b, ms = _arrays(0)
  with pytest.raises(ValueError, match="shape mismatch at '<array>': \\(6, 5\\) vs \\(5, 6\\)"):
    M.ties(b, [ms[0], ms[1].T], density=0.5)
  other = dict(models[0])
  del other["lm_head"]
  with pytest.raises(ValueError, match="different architecture .*lm_head"):
    M.task_arithmetic(base, [models[0], other])
  with pytest.raises(ValueError, match="ties is base-relative and needs a base model"):
    M.ties(None, ms, density=0.5)
  for d in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
      M.dare_linear(b, ms, density=d)
  with pytest.raises(ValueError, match="unknown merge method 'nope'; known methods: .*tsv_m"):
    M.get_method("nope")
  with pytest.raises(ValueError, match="unknown hyper-parameter\\(s\\) \\['densty'\\]"):
    M.ties(b, ms, densty=0.5)
  with pytest.raises(ValueError, match="slerp takes at most 1 model"):
    M.slerp(b, ms, t=0.5)
  with pytest.raises(ValueError, match="model_stock needs at least 2 model"):
    M.model_stock(b, ms[:1])
  with pytest.raises(ValueError, match="`models` must be a list"):
    M.linear(None, b)


def test_docs_composition_example(trees):
  """The 'Composing a new method' example of docs/merging.md, run verbatim."""
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "merging.md").read_text()
  block = re.search(r"### Composing a new method.*?```python\n(.*?)```", text, re.S).group(1)
  ns = {}
  exec(block, ns)  # noqa: S102 - our own documentation
  base, models = trees
  # density 1 (no drop) and a rank above every matrix size: plain TIES without trimming.
  out = ns["dare_ties_lowrank"](base, models, density=1.0, rank=64)
  ref = M.ties(base, models, density=1.0)
  assert_tree_close(out, ref, rtol=1e-4, atol_rel=1e-5)  # LAPACK low-rank of full-rank deltas
  out = jax.jit(lambda b, m: ns["dare_ties_lowrank"](b, m, density=0.5, rank=2))(base, models)
  d = out["layers"]["mlp"]["up_proj"]["kernel"][0] - base["layers"]["mlp"]["up_proj"]["kernel"][0]
  assert np.linalg.matrix_rank(np.asarray(d), tol=1e-6) == 2
