"""The mergekit 0.1.5 methods of h3jax.merging.spherical / mergekit_extra vs mergekit itself.

Same harness as test_merge_oracles.py: mergekit runs every case once per module in
one subprocess (`.venv-mergekit`, built by scripts/setup_oracles.sh; skipped with a
reason when missing); h3jax reads the same YAML unchanged through the CLI's library
entry point and the out-of-core driver. float32 throughout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import merge_fixtures as mf
from test_merge_oracles import _h3jax_from_yaml, _models

pytestmark = pytest.mark.oracle

# case id -> (inputs, n models, with base, yaml body builder(models), tolerance)
CASES = {
    "nuslerp_untied_base": ("untied", 2, True, lambda ms: dict(
        merge_method="nuslerp", models=_models(ms, [dict(weight=1.0), dict(weight=3.0)])), 1e-6),
    "nuslerp_raw_rowwise": ("raw", 2, False, lambda ms: dict(
        merge_method="nuslerp", models=_models(ms, [dict(weight=0.7), dict(weight=0.4)]),
        parameters=dict(nuslerp_flatten=False, nuslerp_row_wise=True)), 1e-6),
    "nuslerp_tied_rows_base": ("tied", 2, True, lambda ms: dict(
        merge_method="nuslerp", models=_models(ms, [dict(weight=2.0), dict(weight=1.0)]),
        parameters=dict(nuslerp_flatten=False)), 1e-6),
    "multislerp_untied_base": ("untied", 3, True, lambda ms: dict(
        merge_method="multislerp", models=_models(ms, [dict(weight=1.0), dict(weight=2.0), dict(weight=0.5)])),
        1e-6),
    "multislerp_raw_nonorm": ("raw", 3, False, lambda ms: dict(
        merge_method="multislerp", models=_models(ms, [dict(weight=0.2), dict(weight=0.3), dict(weight=0.4)]),
        parameters=dict(normalize_weights=False)), 1e-6),
    "karcher_untied_base": ("untied", 3, True, lambda ms: dict(merge_method="karcher",
                                                               models=_models(ms, [{}, {}, {}])), 1e-5),
    "nearswap_untied": ("untied", 1, True, lambda ms: dict(
        merge_method="nearswap", models=_models(ms, [{}]), parameters=dict(t=[0.001, 0.02])), 1e-6),
    "nearswap_raw": ("raw", 1, True, lambda ms: dict(
        merge_method="nearswap", models=_models(ms, [{}]), parameters=dict(t=0.015)), 1e-6),
    "sce_untied_topk": ("untied", 3, True, lambda ms: dict(
        merge_method="sce", models=_models(ms, [{}, {}, {}]), parameters=dict(select_topk=0.3)), 1e-6),
    "passthrough_tied_scale": ("tied", 1, False, lambda ms: dict(
        merge_method="passthrough", models=_models(ms, [dict(scale=[0.5, 2.0])])), 1e-6),
    # Arcee Fusion thresholds |delta| * KL(softmax rows); the KL of nearly equal rows is a sum of
    # cancelling float32 terms, and 1-ulp differences between torch's and XLA's exp move it by ~1%:
    # entries near the threshold may flip ("mask" tolerance, checked below).
    "arcee_fusion_untied": ("untied", 1, True, lambda ms: dict(merge_method="arcee_fusion",
                                                               models=_models(ms, [{}])), "mask"),
    "ram_untied": ("untied", 3, True, lambda ms: dict(
        merge_method="ram", models=_models(ms, [{}, {}, {}]), parameters=dict(epsilon=0.012)), 1e-6),
    "ramplus_tl_raw": ("raw", 3, True, lambda ms: dict(
        merge_method="ramplus_tl", models=_models(ms, [{}, {}, {}]),
        parameters=dict(epsilon=0.02, r=0.5, alpha=0.7)), 1e-6),
}


def _raw_family(root, n_models, seed):
  """merge_fixtures.raw_family without its empty tensor: mergekit's multislerp (> 2 models) and
  arcee_fusion raise on an empty tensor (h3jax passes it through, as for every method)."""
  from safetensors.numpy import save_file
  root.mkdir(parents=True)
  base = mf.random_base({k: v for k, v in mf.RAW_SHAPES.items() if k != "empty"}, seed)
  files = []
  for i in range(n_models + 1):
    t = base if i == 0 else mf.perturb(base, seed + 200 + i, 0.02 * (1 + 0.41 * i))
    files.append(str(root / f"in{i}.safetensors"))
    save_file(t, files[-1], metadata={"format": "pt"})
  return files[0], files[1:]


@pytest.fixture(scope="module")
def mk_extra_runs(tmp_path_factory):
  if not mf.MERGEKIT_PY.exists():
    pytest.skip("mergekit oracle venv missing: run scripts/setup_oracles.sh")
  root = tmp_path_factory.mktemp("mkx")
  fams = {
      "untied": mf.llama_family(root / "untied", 3, tied=False, seed=4)[:2],
      "tied": mf.llama_family(root / "tied", 2, tied=True, seed=5)[:2],
      "raw": _raw_family(root / "raw", 3, seed=6),
  }
  jobs, runs = [], {}
  for cid, (kind, n, with_base, build, tol) in CASES.items():
    base, models = fams[kind]
    body = dict(build(models[:n]), dtype="float32", out_dtype="float32")
    if with_base:
      body["base_model"] = base
    out = root / f"mk_{cid}"
    jobs.append(dict(yaml=yaml.safe_dump(body), out=str(out), raw=kind == "raw"))
    runs[cid] = (body, out, tol)
  # Output dtypes with neither dtype nor out_dtype set, on bf16 inputs (mergekit writes its
  # kernels' result dtype).
  bf_base, bf_models = _bf16_family(root / "bf16")
  for method in DTYPE_METHODS:
    n = 1 if method == "arcee_fusion" else 2
    per_model = [dict(weight=1.0) if method == "task_arithmetic" else {}] * n
    body = dict(merge_method=method, base_model=bf_base, models=_models(bf_models[:n], per_model))
    out = root / f"mk_dtype_{method}"
    jobs.append(dict(yaml=yaml.safe_dump(body), out=str(out)))
    runs[f"dtype_{method}"] = (body, out, None)
  (root / "jobs.json").write_text(json.dumps(jobs))
  mf.run_oracle(mf.MERGEKIT_PY, mf.MERGEKIT_BATCH, root / "jobs.json")
  return runs


DTYPE_METHODS = ("arcee_fusion", "ramplus_tl", "ram", "task_arithmetic", "karcher")


def _bf16_family(root):
  import ml_dtypes
  cfg = dict(mf.llama_config(False), dtype="bfloat16")
  base = mf.random_base(mf.llama_shapes(cfg), 21)
  to_bf16 = lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}
  base_d = mf.write_llama(root / "base", to_bf16(base), cfg)
  return base_d, [mf.write_llama(root / f"m{i}", to_bf16(mf.perturb(base, 50 + i, 0.02)), cfg)
                  for i in range(2)]


def _assert_mask_flips_only(body, ours, theirs, what):
  """Both outputs are base + mask * delta; they may disagree on <= 1% of the mask. A kept entry is
  base + (model - base) in float32 as both compute it, which is not `model` where model - base rounds (signs
  differ, say): a flip there showed up only when torch ran its AVX2 kernels (make test-portable)."""
  f32 = lambda a: np.asarray(a, np.float32)
  base = f32(_cached(body["base_model"])[what.split(": ")[1]])
  kept = base + (f32(_cached(body["models"][0]["model"])[what.split(": ")[1]]) - base)
  flips = ours != theirs
  assert flips.mean() <= 0.01, f"{what}: {flips.mean():.2%} of the entries differ"
  assert np.all((ours[flips] == base[flips]) | (ours[flips] == kept[flips])), what
  assert np.all((theirs[flips] == base[flips]) | (theirs[flips] == kept[flips])), what
  if ours.size > 1:  # a 1-element row has KL 0: everything is kept
    assert 0 < np.mean(ours != base) < 0.5, f"{what}: the mask keeps all or nothing"


_CACHE = {}


def _cached(path):
  if path not in _CACHE:
    _CACHE[path] = mf.read_tensors(path)
  return _CACHE[path]


@pytest.mark.skipif(not mf.MERGEKIT_PY.exists(), reason="mergekit oracle venv missing: run scripts/setup_oracles.sh")
@pytest.mark.parametrize("cid", sorted(CASES))
def test_matches_mergekit(mk_extra_runs, cid, tmp_path):
  body, oracle_out, tol = mk_extra_runs[cid]
  ours = _h3jax_from_yaml(body, tmp_path / "out", tmp_path)
  theirs = mf.read_tensors(oracle_out)
  assert sorted(ours) == sorted(theirs), f"{cid}: tensor names differ: {set(ours) ^ set(theirs)}"
  for k in theirs:
    assert ours[k].shape == theirs[k].shape, (cid, k)
    if tol == "mask":
      _assert_mask_flips_only(body, ours[k], theirs[k], f"{cid}: {k}")
      continue
    err = np.max(np.abs(ours[k] - theirs[k]) / (1 + np.abs(theirs[k])), initial=0.0)
    assert err <= tol, f"{cid}: {k} differs from the oracle by {err:.3g} (rel)"
  # Not vacuous: the output differs from every input, and the method did something per tensor.
  inputs = [body["base_model"]] if "base_model" in body else []
  inputs += [m["model"] for m in body["models"]]
  for path in inputs:
    x = mf.read_tensors(path)
    assert any(np.abs(ours[k] - x[k]).max() > 1e-4 for k in ours if ours[k].size), (cid, path)


@pytest.mark.skipif(not mf.MERGEKIT_PY.exists(), reason="mergekit oracle venv missing: run scripts/setup_oracles.sh")
@pytest.mark.parametrize("method", DTYPE_METHODS)
def test_output_dtype_is_mergekits(mk_extra_runs, method, tmp_path):
  """bf16 inputs, no dtype / out_dtype: mergekit writes float32 for arcee_fusion and ramplus_tl
  (a float32 mask / ratio promotes its kernel's result) and bf16 for the others; so does h3jax."""
  from safetensors import safe_open
  body, out, _ = mk_extra_runs[f"dtype_{method}"]
  _h3jax_from_yaml(body, tmp_path / "ours", tmp_path)

  def dtypes(folder):
    res = {}
    for f in sorted(folder.glob("*.safetensors")):
      with safe_open(str(f), "np") as r:
        res.update({k: r.get_slice(k).get_dtype() for k in r.keys()})
    return res
  theirs, ours = dtypes(out), dtypes(tmp_path / "ours")
  assert ours == theirs
  expected = "F32" if method in ("arcee_fusion", "ramplus_tl") else "BF16"
  assert set(theirs.values()) == {expected}
