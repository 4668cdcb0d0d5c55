"""h3jax merging vs the real oracles: mergekit 0.1.5 and fusion-bench 0.2.33 (own virtualenvs).

Run with `make oracles` first (scripts/setup_oracles.sh builds .venv-mergekit and
.venv-fusionbench); the tests skip with a reason when those venvs are missing.
Each oracle runs once per module in one subprocess over every case (a process
start costs ~15 s of imports); h3jax runs the same configs through the CLI's
library entry point (mergekit YAML read unchanged) and the out-of-core driver.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import yaml

import merge_fixtures as mf

pytestmark = pytest.mark.oracle

needs_mergekit = pytest.mark.skipif(not mf.MERGEKIT_PY.exists(),
                                    reason="mergekit oracle venv missing: run scripts/setup_oracles.sh")
needs_fusionbench = pytest.mark.skipif(not mf.FUSIONBENCH_PY.exists(),
                                       reason="fusion-bench oracle venv missing: run scripts/setup_oracles.sh")


def _models(paths, params):
  return [dict(model=p, parameters=q) if q else dict(model=p) for p, q in zip(paths, params)]


# case id -> (inputs: "untied" | "tied" | "raw", n models, yaml body builder(base, models))
MK_CASES = {
    "linear_untied": ("untied", 3, lambda b, ms: dict(
        merge_method="linear", models=_models(ms, [dict(weight=1.0), dict(weight=2.0), dict(weight=0.5)]))),
    "linear_tied_nonorm": ("tied", 2, lambda b, ms: dict(
        merge_method="linear", models=_models(ms, [dict(weight=0.3), dict(weight=0.9)]),
        parameters=dict(normalize=False))),
    "task_arithmetic_gradient": ("untied", 3, lambda b, ms: dict(
        merge_method="task_arithmetic", base_model=b,
        models=_models(ms, [dict(weight=[0.2, 1.0]), dict(weight=0.5), dict(weight=[1.0, 0.0, 0.4])]),
        parameters=dict(**{"lambda": 0.7}))),
    "task_arithmetic_raw_norm": ("raw", 3, lambda b, ms: dict(
        merge_method="task_arithmetic", base_model=b, models=_models(ms, [{}, {}, {}]),
        parameters=dict(weight=0.8, normalize=True))),
    "ties_untied": ("untied", 3, lambda b, ms: dict(
        merge_method="ties", base_model=b,
        models=_models(ms, [dict(weight=1.0, density=0.3)] * 3), parameters=dict(normalize=True))),
    "ties_tied_filters": ("tied", 2, lambda b, ms: dict(
        merge_method="ties", base_model=b,
        models=_models(ms, [dict(weight=1.0, density=[dict(filter="self_attn", value=0.5), dict(value=0.2)]),
                            dict(weight=-0.5, density=0.35)]),
        parameters={"lambda": 1.3, "int8_mask": True})),
    "ties_raw": ("raw", 3, lambda b, ms: dict(
        merge_method="ties", base_model=b, models=_models(ms, [dict(weight=1.0, density=0.25)] * 3))),
    "breadcrumbs_untied": ("untied", 3, lambda b, ms: dict(
        merge_method="breadcrumbs", base_model=b,
        models=_models(ms, [dict(weight=1.0, density=0.6, gamma=0.05)] * 3))),
    "breadcrumbs_ties_raw_big_gamma": ("raw", 2, lambda b, ms: dict(
        merge_method="breadcrumbs_ties", base_model=b,
        models=_models(ms, [dict(weight=1.0, density=0.9, gamma=0.2), dict(weight=0.7, density=0.5, gamma=0.1)]),
        parameters=dict(normalize=True))),
    "slerp_gradient": ("untied", 1, lambda b, ms: dict(
        merge_method="slerp", base_model=b, models=_models(ms, [{}]), parameters=dict(t=[0.0, 0.3, 1.0]))),
    "slerp_raw": ("raw", 1, lambda b, ms: dict(
        merge_method="slerp", base_model=b, models=_models(ms, [{}]), parameters=dict(t=0.35))),
    "model_stock_untied": ("untied", 3, lambda b, ms: dict(merge_method="model_stock", base_model=b,
                                                           models=_models(ms, [{}, {}, {}]))),
    "model_stock_raw_filterwise": ("raw", 2, lambda b, ms: dict(
        merge_method="model_stock", base_model=b, models=_models(ms, [{}, {}]),
        parameters=dict(filter_wise=True))),
}
# Random methods: one expert, weight 1, so the oracle's mask is recoverable from its output.
MK_RANDOM = {
    "dare_linear": dict(density=0.4),
    "dare_ties": dict(density=0.6),
    "della_linear": dict(density=0.5, epsilon=0.2),
    "della": dict(density=0.4, epsilon=0.15),
}


@pytest.fixture(scope="module")
def mk_runs(tmp_path_factory):
  if not mf.MERGEKIT_PY.exists():
    pytest.skip("mergekit oracle venv missing: run scripts/setup_oracles.sh")
  root = tmp_path_factory.mktemp("mk")
  fams = {
      "untied": mf.llama_family(root / "untied", 3, tied=False, seed=1)[:2],
      "tied": mf.llama_family(root / "tied", 2, tied=True, seed=2)[:2],
      "raw": mf.raw_family(root / "raw", 3, seed=3),
  }
  jobs, runs = [], {}
  for cid, (kind, n, build) in MK_CASES.items():
    base, models = fams[kind]
    body = dict(build(base, models[:n]), dtype="float32", out_dtype="float32")
    out = root / f"mk_{cid}"
    jobs.append(dict(yaml=yaml.safe_dump(body), out=str(out), raw=kind == "raw"))
    runs[cid] = (body, out, kind)
  for method, params in MK_RANDOM.items():
    base, models = fams["untied"]
    body = dict(merge_method=method, base_model=base, models=_models(models[:1], [dict(weight=1.0, **params)]),
                dtype="float32", out_dtype="float32")
    out = root / f"mk_{method}"
    jobs.append(dict(yaml=yaml.safe_dump(body), out=str(out), seed=7))
    runs[method] = (body, out, "untied")
  (root / "jobs.json").write_text(json.dumps(jobs))
  mf.run_oracle(mf.MERGEKIT_PY, mf.MERGEKIT_BATCH, root / "jobs.json")
  return root, runs


def _h3jax_from_yaml(body, out_dir, tmp):
  from h3jax.merging.streaming import merge_from_config
  cfg = pathlib.Path(tmp) / "merge.yaml"
  cfg.write_text(yaml.safe_dump(body))
  merge_from_config(str(cfg), str(out_dir), progress=False)
  return mf.read_tensors(out_dir)


def _assert_elementwise_close(ours, theirs, what):
  assert sorted(ours) == sorted(theirs), f"{what}: tensor names differ: {set(ours) ^ set(theirs)}"
  for k in theirs:
    assert ours[k].shape == theirs[k].shape, (what, k)
    err = np.max(np.abs(ours[k] - theirs[k]) / (1 + np.abs(theirs[k])), initial=0.0)
    assert err <= 1e-6, f"{what}: {k} differs from the oracle by {err:.3g} (rel)"


@needs_mergekit
@pytest.mark.parametrize("cid", sorted(MK_CASES))
def test_matches_mergekit(mk_runs, cid, tmp_path):
  root, runs = mk_runs
  body, oracle_out, kind = runs[cid]
  ours = _h3jax_from_yaml(body, tmp_path / "out", tmp_path)
  theirs = mf.read_tensors(oracle_out)
  _assert_elementwise_close(ours, theirs, cid)
  # The merge really moved away from the base (guards against a vacuous comparison).
  base = mf.read_tensors(body["base_model"]) if "base_model" in body else None
  if base is not None and cid != "slerp_gradient":
    assert any(np.abs(ours[k] - base[k]).max() > 1e-4 for k in ours if ours[k].size)


def _recover(base, out, expert):
  """Oracle mask and per-tensor scale from a one-expert, weight-1 merge."""
  tau = expert - base
  got = out - base
  mask = got != 0
  scale = np.where(mask, got / np.where(tau == 0, 1, tau), 0)
  return tau, mask, scale


@needs_mergekit
@pytest.mark.parametrize("method", sorted(MK_RANDOM))
def test_random_methods_match_mergekit_given_its_mask(mk_runs, method, tmp_path):
  """DARE/DELLA: recover mergekit's Bernoulli mask, check kept values are tau * ||tau||_1/||m tau||_1
  (0.1.5 L1 rescaling) via h3jax's blocks, and that h3jax's own run keeps ~density with the
  same rescaling rule."""
  import jax.numpy as jnp

  from h3jax.merging import blocks
  root, runs = mk_runs
  body, oracle_out, _ = runs[method]
  base = mf.read_tensors(body["base_model"])
  expert = mf.read_tensors(body["models"][0]["model"])
  theirs = mf.read_tensors(oracle_out)
  ours = _h3jax_from_yaml(body, tmp_path / "out", tmp_path)
  density = MK_RANDOM[method]["density"]
  kept_oracle, kept_ours, total = 0, 0, 0
  for k in theirs:
    tau, mask, _ = _recover(base[k], theirs[k], expert[k])
    want = base[k] + np.asarray(blocks.rescale_l1(jnp.asarray(tau), jnp.asarray(np.where(mask, tau, 0))))
    np.testing.assert_allclose(theirs[k], want, rtol=2e-6, atol=1e-7, err_msg=f"{method} {k}")
    tau_o, mask_o, _ = _recover(base[k], ours[k], expert[k])
    want_o = base[k] + np.asarray(blocks.rescale_l1(jnp.asarray(tau_o), jnp.asarray(np.where(mask_o, tau_o, 0))))
    np.testing.assert_allclose(ours[k], want_o, rtol=2e-6, atol=1e-7, err_msg=f"h3jax {method} {k}")
    kept_oracle += mask.sum()
    kept_ours += mask_o.sum()
    total += mask.size
  sd = np.sqrt(density * (1 - density) / total)
  assert abs(kept_oracle / total - density) < 5 * sd + 0.01
  assert abs(kept_ours / total - density) < 5 * sd + 0.01
  # Reproducible: same seed -> same output; another seed -> another mask.
  again = _h3jax_from_yaml(body, tmp_path / "again", tmp_path)
  assert all(np.array_equal(again[k], ours[k]) for k in ours)


# ----------------------------------------------------------------------------- fusion-bench 0.2.33

FB_SHAPES = {"w_a": (40, 24), "w_b": (24, 40), "sq": (16, 16), "vec": (40,), "cube": (3, 8, 6)}
# name -> (h3jax method, .py-config parameters) run through the out-of-core driver.
FB_DRIVER = {
    "tsv_m": ("tsv_m", dict(alpha=1.0)),
    "tsv_m_alpha": ("tsv_m", dict(alpha=0.6)),
    "iso_c": ("iso_c", dict(scaling_factor=1.0)),
    "iso_cts": ("iso_cts", dict(scaling_factor=1.0, common_space_fraction=0.8)),
    "task_arithmetic": ("task_arithmetic", dict(lambda_=0.3)),
    # Global trimming, streamed: the driver finds each model's exact threshold in two passes.
    "ties_sum": ("ties", dict(mode="fusion_bench", density=0.2, lambda_=0.7, merge_func="sum")),
    "ties_mean": ("ties", dict(mode="fusion_bench", density=0.3, lambda_=1.0, merge_func="mean")),
}
FB_TIES = {"ties_sum": dict(density=0.2, lambda_=0.7, merge_func="sum"),
           "ties_mean": dict(density=0.3, lambda_=1.0, merge_func="mean")}


@pytest.fixture(scope="module")
def fb_runs(tmp_path_factory):
  if not mf.FUSIONBENCH_PY.exists():
    pytest.skip("fusion-bench oracle venv missing: run scripts/setup_oracles.sh")
  from safetensors.numpy import save_file
  root = tmp_path_factory.mktemp("fb")
  base = mf.random_base(FB_SHAPES, 11)
  files = []
  for i, t in enumerate([base] + [mf.perturb(base, 300 + i, 0.03 * (1 + 0.5 * i)) for i in range(3)]):
    files.append(str(root / f"in{i}.safetensors"))
    save_file(t, files[-1])
  (root / "out").mkdir()
  zero_files = _zero_family(root)
  (root / "zero_out").mkdir()
  (root / "job.json").write_text(json.dumps([
      dict(base=files[0], models=files[1:], out=str(root / "out")),
      dict(base=zero_files[0], models=zero_files[1:], out=str(root / "zero_out"))]))
  mf.run_oracle(mf.FUSIONBENCH_PY, mf.FUSIONBENCH_BATCH, root / "job.json")
  return root, files


# Tensor -> experts whose task vector is exactly zero there (FFN-only LoRA experts leave all other
# tensors unchanged): none, one, two, all three.
FB_ZERO = {"w_a": (), "w_b": (1,), "sq": (0, 2), "tall": (2,), "z2": (0, 1, 2), "vec": (0,),
           "cube": (0, 1, 2)}
FB_ZERO_SHAPES = dict(FB_SHAPES, tall=(36, 10), z2=(20, 14))


def _zero_family(root):
  from safetensors.numpy import save_file
  base = mf.random_base(FB_ZERO_SHAPES, 12)
  files = [str(root / "zero_in0.safetensors")]
  save_file(base, files[0])
  for i in range(3):
    m = mf.perturb(base, 400 + i, 0.03 * (1 + 0.5 * i))
    m = {k: (base[k] if i in FB_ZERO[k] else v) for k, v in m.items()}
    files.append(str(root / f"zero_in{i + 1}.safetensors"))
    save_file(m, files[-1])
  return files


def _rel_fro(a, b):
  return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-12))


@needs_fusionbench
@pytest.mark.parametrize("name", sorted(FB_DRIVER))
def test_matches_fusion_bench_via_driver(fb_runs, name, tmp_path):
  """An ml_collections .py config through the CLI entry point equals fusion-bench's state dict."""
  root, files = fb_runs
  method, params = FB_DRIVER[name]
  cfg = tmp_path / "merge_cfg.py"
  cfg.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      f"  c.merge_method = {method!r}\n"
      f"  c.base_model = {files[0]!r}\n"
      f"  c.models = [dict(model=m) for m in {files[1:]!r}]\n"
      f"  c.parameters = {params!r}\n"
      "  return c\n")
  from h3jax.merging.streaming import merge_from_config
  merge_from_config(str(cfg), str(tmp_path / "out"), progress=False)
  ours = mf.read_tensors(tmp_path / "out")
  theirs = mf.read_tensors(root / "out" / f"{name}.safetensors")
  assert sorted(ours) == sorted(theirs)
  base = mf.read_tensors(files[0])
  for k in theirs:
    err = _rel_fro(ours[k] - base[k], theirs[k] - base[k])  # error relative to the merged delta
    assert err <= 1e-4, f"{name}: {k} rel Frobenius error {err:.3g}"


@needs_fusionbench
@pytest.mark.parametrize("name", sorted(FB_TIES))
def test_ties_fusion_bench_mode(fb_runs, name):
  """Global trimming over the whole model, sign with majority for zeros, sum/mean."""
  from h3jax import merging
  root, files = fb_runs
  base, *models = [mf.read_tensors(f) for f in files]
  ours = merging.get_method("ties")(base, models, mode="fusion_bench", **FB_TIES[name])
  theirs = mf.read_tensors(root / "out" / f"{name}.safetensors")
  for k in theirs:
    err = np.max(np.abs(np.asarray(ours[k]) - theirs[k]) / (1 + np.abs(theirs[k])))
    assert err <= 1e-6, f"{name}: {k} differs by {err:.3g}"


@needs_fusionbench
def test_emr_matches_fusion_bench(fb_runs):
  from h3jax import merging
  root, files = fb_runs
  base, *models = [mf.read_tensors(f) for f in files]
  parts = merging.get_method("emr")(base, models, return_parts=True)
  theirs = mf.read_tensors(root / "out" / "emr.safetensors")
  np.testing.assert_allclose(parts["rescalers"], theirs["rescalers"], rtol=1e-5)
  for k in base:
    np.testing.assert_allclose(np.asarray(parts["unified"][k]), theirs["uni." + k], rtol=1e-6, atol=1e-7)
    for i in range(len(models)):
      np.testing.assert_array_equal(np.asarray(parts["masks"][i][k]), theirs[f"mask{i}." + k] > 0)


@needs_fusionbench
def test_zero_task_vectors_vs_fusion_bench(fb_runs, tmp_path):
  """Experts unchanged on some tensors. Where no task vector is zero, h3jax (driver, default
  solver) equals fusion-bench; where all are zero, both give the base. Where some are zero the
  stated difference (docs/merging.md): fusion-bench's torch SVD of a zero matrix returns identity
  columns with s = 0, which enter its polar factors; h3jax drops them. Both sides are pinned to a
  float64 TSV-M with / without those columns, so nothing else differs."""
  from test_merging_degenerate import tsv_reference
  root, _ = fb_runs
  files = sorted(str(p) for p in root.glob("zero_in*.safetensors"))
  base, *models = [mf.read_tensors(f) for f in files]
  for name, method, params in (("tsv_m", "tsv_m", dict(alpha=1.0)), ("iso_c", "iso_c", {}),
                               ("iso_cts", "iso_cts", {}), ("task_arithmetic", "task_arithmetic",
                                                            dict(lambda_=0.3))):
    cfg = tmp_path / f"{name}.py"
    cfg.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "  c = ml_collections.ConfigDict()\n"
        f"  c.merge_method = {method!r}\n"
        f"  c.base_model = {files[0]!r}\n"
        f"  c.models = [dict(model=m) for m in {files[1:]!r}]\n"
        f"  c.parameters = {params!r}\n"
        "  return c\n")
    from h3jax.merging.streaming import merge_from_config
    merge_from_config(str(cfg), str(tmp_path / name), progress=False)
    ours = mf.read_tensors(tmp_path / name)
    theirs = mf.read_tensors(root / "zero_out" / f"{name}.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k, zero in FB_ZERO.items():
      assert np.isfinite(ours[k]).all(), (name, k)
      if len(zero) == 3:
        np.testing.assert_array_equal(ours[k], base[k], err_msg=f"{name} {k}")
        np.testing.assert_array_equal(theirs[k], base[k], err_msg=f"fusion-bench {name} {k}")
        continue
      err = _rel_fro(ours[k] - base[k], theirs[k] - base[k])
      if not zero or base[k].ndim != 2 or name in ("iso_c", "task_arithmetic"):
        assert err <= 1e-4, f"{name}: {k} (zero tasks {zero}) rel Frobenius error {err:.3g}"
      elif name == "tsv_m":
        ms = [models[i][k] for i in range(3)]
        fb_ref = tsv_reference(base[k], ms, zero="identity")
        ours_ref = tsv_reference(base[k], ms, zero="drop")
        assert _rel_fro(theirs[k] - base[k], fb_ref - base[k]) <= 1e-4, f"fusion-bench {k}"
        assert _rel_fro(ours[k] - base[k], ours_ref - base[k]) <= 1e-4, f"h3jax {k}"
        assert err > 1e-3, f"{k}: expected the identity columns to change fusion-bench's result"
