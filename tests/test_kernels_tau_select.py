"""The streaming TIES cuts through the native pass (h3jax/kernels/tau_select.cc) against the numpy path and
a brute-force sort, on the degenerate task vectors of real merges."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from h3jax.kernels import native, tau_select
from h3jax.merging import select
from h3jax.merging.streaming import host_topk

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: the kernel cannot be built")

SHAPE = (300, 257)  # 77,100 entries: above select.BRACKET_MIN, so the sampled bracket runs


def _bits(model, base):
  with np.errstate(over="ignore"):  # the "inf difference" case
    d = model.astype(np.float32) - base.astype(np.float32)
  return d.view(np.uint32) & np.uint32(0x7FFFFFFF)


def _brute_cut(model, base, k):
  """(thr, cutoff) by a full sort: the k-th largest |tau| and the flat index of the last tie kept."""
  u = _bits(model, base).reshape(-1)
  thr = np.sort(u)[u.size - k]
  if thr == 0:
    return 0, -1
  need = k - np.count_nonzero(u > thr)
  eq = np.flatnonzero(u == thr)
  return int(thr), (u.size - 1 if need == eq.size else int(eq[need - 1]))


def _numpy_cuts(monkeypatch, base, models, density, load_dtype=None):
  with monkeypatch.context() as m:
    m.setattr(tau_select, "supported", lambda *a, **k: False)
    return host_topk.host_cuts(base, models, density, load_dtype)


def _cases(rng):
  base = rng.standard_normal(SHAPE).astype(np.float32)
  n = base.size
  gauss = lambda: rng.standard_normal(SHAPE)  # noqa: E731
  yield "dense", base, base + gauss()
  yield "identical to the base (LoRA never touched it)", base, base.copy()
  yield "sparse 5%: zeros fill the bracket's low end", base, base + np.where(rng.random(SHAPE) < 0.05, gauss(), 0)
  yield "repeated magnitudes: the index tie-break", base, base + rng.integers(-3, 4, SHAPE) * 0.25
  yield "negative zeros", np.zeros(SHAPE, np.float32), np.where(rng.random(SHAPE) < 0.5, -0.0, 1.0)
  yield "one non-zero entry", base, base + (np.arange(n) == n // 3).reshape(SHAPE) * 2.0
  yield "inf difference", np.full(SHAPE, -3e38, np.float32), np.where(rng.random(SHAPE) < 0.1, 3e38, 0.0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the numpy path's, same case
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.99, 1 - 1 / 77100])
def test_native_cuts_equal_numpy_and_a_full_sort(monkeypatch, density):
  rng = np.random.default_rng(int(density * 1000))
  for why, base, model in _cases(rng):
    model = model.astype(np.float32)
    assert tau_select.supported(model, base)
    got = host_topk.host_cuts(base, [model], [density])
    want = _numpy_cuts(monkeypatch, base, [model], [density])
    k = max(1, int(density * base.size))
    thr, cut = _brute_cut(model, base, k)
    assert got[0].view(np.uint32)[0] == thr and got[1][0] == cut, why
    np.testing.assert_array_equal(got[0], want[0], err_msg=why)
    np.testing.assert_array_equal(got[1], want[1], err_msg=why)


@pytest.mark.parametrize("load_dtype", [None, "bfloat16", "float32"])
def test_bfloat16_inputs(monkeypatch, load_dtype):
  rng = np.random.default_rng(1)
  bf = ml_dtypes.bfloat16
  base = rng.standard_normal(SHAPE).astype(bf)
  models = [(base.astype(np.float32) + rng.integers(-2, 3, SHAPE) * 0.125).astype(bf),
            (base.astype(np.float32) + rng.standard_normal(SHAPE) * 1e-2).astype(bf)]
  ld = None if load_dtype is None else np.dtype(getattr(ml_dtypes, load_dtype, None) or load_dtype)
  assert tau_select.supported(models[0], base, ld)
  got = host_topk.host_cuts(base, models, [0.3, 0.05], ld)
  want = _numpy_cuts(monkeypatch, base, models, [0.3, 0.05], ld)
  for i, (m, d) in enumerate(zip(models, [0.3, 0.05])):
    assert (got[0].view(np.uint32)[i], got[1][i]) == _brute_cut(m, base, int(d * base.size))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_one_pass_counts_equal_numpy():
  """Three models with their own brackets in one pass; the NaN / inf count covers the base and the models."""
  rng = np.random.default_rng(2)
  base = rng.standard_normal(SHAPE).astype(np.float32)
  models = [(base + np.where(rng.random(SHAPE) < p, rng.standard_normal(SHAPE), 0)).astype(np.float32)
            for p in (0.3, 1.0, 0.0)]
  us = [_bits(m, base).reshape(-1) for m in models]
  q = np.quantile(us[0], [0.5, 0.7, 0.9]).astype(np.uint32)
  for ends in [[(0, 0), (0, 0xFFFFFFFF), (0, 0)], [(0, q[1]), (q[0], q[2]), (q[2], q[2])],
               [(q[1], q[1] + 1), (q[2], q[2]), (0, 5)]]:
    lo, hi = zip(*ends)
    counts, cands, bad = tau_select.brackets(models, base, lo, hi, [base.size] * 3)
    assert bad == 0
    for j, (u, l, h) in enumerate(zip(us, lo, hi)):
      assert tuple(counts[j]) == (np.count_nonzero(u > h), np.count_nonzero(u == h), np.count_nonzero(u == l))
      np.testing.assert_array_equal(cands[j], u[(u > l) & (u < h)])  # in index order
  inside = np.count_nonzero((us[0] > q[0]) & (us[0] < q[2]))
  assert tau_select.brackets(models[:1], base, [q[0]], [q[2]], [inside - 1]) is None  # no room: nothing counted
  assert tau_select.brackets(models[:1], base, [q[0]], [q[2]], [inside])[1][0].size == inside
  for where, arrays in (("base", [models, base.copy()]), ("model", [[models[0], models[1].copy()], base])):
    bad_x = arrays[1] if where == "base" else arrays[0][1]
    bad_x[3, 4], bad_x[7, 0], bad_x[9, 9] = np.nan, np.inf, -np.inf
    assert tau_select.brackets(*arrays, [0] * len(arrays[0]), [0] * len(arrays[0]), [8] * len(arrays[0]))[2] == 3


def test_a_misleading_sample_only_costs_passes(monkeypatch):
  """A sample that misses (every draw the same entry) makes the bracket widen and the first candidate
  buffer overflow; the cut stays exact."""
  rng = np.random.default_rng(3)
  base = rng.standard_normal(SHAPE).astype(np.float32)
  model = (base + rng.standard_normal(SHAPE)).astype(np.float32)
  calls = []
  real = tau_select.brackets
  monkeypatch.setattr(select, "sample_indices", lambda n: np.zeros(1 << 14, np.int64))
  monkeypatch.setattr(tau_select, "brackets", lambda *a: calls.append(a[4][0]) or real(*a))
  for density in (0.1, 0.9):
    k = int(density * base.size)
    got = host_topk.host_cuts(base, [model], [density])
    assert (got[0].view(np.uint32)[0], got[1][0]) == _brute_cut(model, base, k)
  assert len(calls) > 2 and base.size in calls  # widened, and retried with room for every entry


def test_several_models_one_pass_and_the_input_check(monkeypatch):
  """host_cuts_checked: one native pass for every model cut natively; finite True / False where it read every
  input, None where a model was kept whole or cut by numpy (the driver then checks the inputs itself)."""
  rng = np.random.default_rng(4)
  base = rng.standard_normal(SHAPE).astype(np.float32)
  models = [(base + rng.standard_normal(SHAPE) * s).astype(np.float32) for s in (1.0, 0.1, 0.0)]
  passes = []
  real = tau_select.brackets
  monkeypatch.setattr(tau_select, "brackets", lambda *a: passes.append(len(a[0])) or real(*a))
  thr, cut, finite = host_topk.host_cuts_checked(base, models, [0.2, 0.5, 0.7])
  assert passes == [3] and finite is True
  want = _numpy_cuts(monkeypatch, base, models, [0.2, 0.5, 0.7])
  np.testing.assert_array_equal(thr, want[0])
  np.testing.assert_array_equal(cut, want[1])
  assert host_topk.host_cuts_checked(base, models, [0.2, 1.0, 0.7])[2] is None  # one kept whole
  assert host_topk.host_cuts_checked(base, [models[0], models[1].astype(np.float16)], [0.2, 0.5])[2] is None
  models[2][5, 5] = np.nan
  assert host_topk.host_cuts_checked(base, models, [0.2, 0.5, 0.7])[2] is False


def test_unsupported_inputs_take_the_numpy_path(monkeypatch):
  f32 = np.ones(SHAPE, np.float32)
  assert not tau_select.supported(f32.astype(np.float16), f32.astype(np.float16))
  assert not tau_select.supported(f32.astype(ml_dtypes.bfloat16), f32)  # mixed dtypes
  assert not tau_select.supported(f32, f32, np.dtype(ml_dtypes.bfloat16))  # a narrowing load dtype
  assert not tau_select.supported(np.ones((257, 300), np.float32).T, f32)  # not contiguous
  monkeypatch.setenv(native.ENABLE_ENV, "0")
  assert not tau_select.supported(f32, f32)
