"""The yardsticks of experiments/tsvm_vs_fusionbench.py (experiments/tsvm_refs.py) and experiments/merge_3h.py.

docs/merging.md ("TSV-M vs fusion-bench on FFN-only LoRA experts") reports errors against the
script's float64 TSV-M / Iso-CTS re-computations; these tests check that those implement the same
maths as h3jax (and so fusion-bench) where the answer is well defined: full-rank task vectors with
separated spectra, and the rank-capped TSV-M of low-rank ones. Tiny random matrices, no files.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from h3jax import merging
from tests.numerics import rel_err

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def exp():
  return _load("tsvm_refs")


def _full_rank_tasks(rng, m=24, n=18, t=3):
  """Task vectors with geometrically spaced singular values: every triple is well determined."""
  base = rng.standard_normal((m, n)).astype(np.float32)
  taus = []
  for _ in range(t):
    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    taus.append(((u * 0.8 ** np.arange(n)) @ v.T * 0.1).astype(np.float32))
  return base, [base + x for x in taus]


def _taus64(base, models):
  return [m.astype(np.float64) - base for m in models]


def test_float64_tsv_m_is_fusionbench_tsv_m(exp):
  base, models = _full_rank_tasks(np.random.default_rng(0))
  taus = _taus64(base, models)
  ref = exp.tsv_m_delta64([np.linalg.svd(t, full_matrices=False) for t in taus], min(base.shape) // 3)
  ours = np.asarray(merging.tsv_m(base, models, solver="svd"), np.float64) - base
  assert rel_err(ours, ref) < 1e-4


def test_float64_capped_tsv_m_is_rank_cap_numerical(exp):
  rng = np.random.default_rng(1)
  base = rng.standard_normal((30, 20)).astype(np.float32)
  models = [base + (0.05 * rng.standard_normal((30, 2)) @ rng.standard_normal((2, 20))).astype(np.float32)
            for _ in range(3)]  # rank 2 < floor(20 / 3): the rest of each spectrum is rounding
  svds = [np.linalg.svd(t, full_matrices=False) for t in _taus64(base, models)]
  ref = exp.tsv_m_delta64(svds, 6, rank_rtol=exp.RANK_RTOL)
  ours = np.asarray(merging.tsv_m(base, models, rank_cap="numerical"), np.float64) - base
  assert rel_err(ours, ref) < 1e-4
  assert exp.signal_share(ref, svds) == pytest.approx(1.0, abs=1e-9)
  # The uncapped reference keeps the rounding-noise triples: part of its delta leaves the tasks' spans.
  assert exp.signal_share(exp.tsv_m_delta64(svds, 6), svds) < 0.999


def test_float64_iso_cts_is_fusionbench_iso_cts(exp):
  base, models = _full_rank_tasks(np.random.default_rng(2))
  ref = exp.iso_cts_delta64(_taus64(base, models), 0.8)
  ours = np.asarray(merging.iso_cts(base, models), np.float64) - base
  assert rel_err(ours, ref) < 1e-4


def test_perturbation_is_a_float32_svds_backward_error(exp):
  tau = np.random.default_rng(3).standard_normal((400, 300))
  svd = np.linalg.svd(tau, full_matrices=False)
  (pert,) = exp.float32_perturbed([svd])
  assert np.linalg.norm(pert - tau, 2) / (exp.EPS32 * svd[1][0]) == pytest.approx(1.0, rel=0.1)


def test_cliff_rank(exp):
  s = np.array([1.0, 0.6, 0.3, 1.1e-5, 1e-5, 0.9e-5, 0.8e-5, 0.0])
  assert exp.cliff_rank(s, 5) == 3
  assert exp.cliff_rank(np.zeros(6), 3) == 1  # all zero: no cliff, nothing divides by zero


def test_group_of(exp):
  assert exp.group_of("model.layers.3.mlp.down_proj.weight") == "ffn down"
  assert exp.group_of("model.layers.0.self_attn.q_proj.weight") == "attention"
  assert exp.group_of("model.layers.0.input_layernorm.weight") == "norms"
  assert exp.group_of("model.norm.weight") == "norms"
  assert exp.group_of("model.embed_tokens.weight") == "embedding"


def test_merge_3h_weight_stats():
  stats = _load("merge_3h").weight_stats
  base = {"a": np.ones((2, 3), np.float32), "b": np.full((4,), 2.0, np.float32)}
  moved = {"a": base["a"] + np.float32(0.5) * np.eye(2, 3, dtype=np.float32), "b": base["b"]}
  st = stats(base, moved)
  assert st["tensors"] == 2 and st["tensors_equal_base"] == 1
  assert st["rel_dist"] == pytest.approx(np.sqrt(0.5) / np.sqrt(6 + 16), rel=1e-12)
  assert stats(base, base) == {"rel_dist": 0.0, "tensors_equal_base": 2, "tensors": 2}


def test_merge_3h_same_as_base(tmp_path):
  same = _load("merge_3h").same_as_base
  rows = {"base": [("a", "x"), ("b", "y"), ("mc", None)], "m": [("a", "x"), ("b", "z"), ("mc", None)]}
  for name, items in rows.items():
    (tmp_path / f"samples_{name}.jsonl").write_text("".join(
        json.dumps({"id": i, **({"response": r} if r is not None else {})}) + "\n" for i, r in items))
  assert same(tmp_path, ["base", "m"]) == {"base": {"same": 2, "n": 2}, "m": {"same": 1, "n": 2}}
