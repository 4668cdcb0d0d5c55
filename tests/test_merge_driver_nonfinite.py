"""The merge driver on what is not finite: NaN / inf inputs (checked as read, or by the TIES cuts' native pass
on large tensors), merged tensors that overflow, and multislerp without an answer. Each stops the merge with
one error and writes nothing, or keeps the base tensor with --nonfinite=keep_base."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

import merge_fixtures as mf
from h3jax.kernels import tau_select
from h3jax.merging.streaming import driver, host_topk


def test_multislerp_without_an_answer_is_an_error_and_writes_nothing(tmp_path):
  v = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  files = []
  for i, x in enumerate([v, -v, v]):  # weights 1, 2, 1: the weighted unit mean is zero
    files.append(str(tmp_path / f"m{i}.safetensors"))
    save_file({"w": x}, files[-1])
  spec = mf.spec("multislerp", None, files, model_params=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}])
  with pytest.raises(driver.MergeError, match=r"multislerp: the weighted sum of the unit task vectors of 'w'"):
    driver.run_merge(spec, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


BIG = (300, 257)  # above select.BRACKET_MIN: TIES cuts (and checks) it in the native pass where it is built


def _nonfinite_family(tmp_path, bad_model=1, shape=(6, 4)):
  """Raw files: base + 2 models; 'w_a' of model `bad_model` (-1: the base) holds a NaN and an inf."""
  rng = np.random.default_rng(3)
  base = {"w_a": rng.standard_normal(shape).astype(np.float32), "w_b": rng.standard_normal((4, 6)).astype(np.float32)}
  files = [str(tmp_path / "base.safetensors")]
  save_file(base, files[0])
  for i in range(2):
    m = {k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    if i == bad_model:
      m["w_a"][0, 0], m["w_a"][2, 1] = np.nan, np.inf
    files.append(str(tmp_path / f"m{i}.safetensors"))
    save_file(m, files[-1])
  if bad_model == -1:
    bad = dict(base, w_a=base["w_a"].copy())
    bad["w_a"][0, 0], bad["w_a"][2, 1] = np.nan, np.inf
    save_file(bad, files[0])
  return base, files


@pytest.mark.parametrize("method,params,shape,bad", [
    ("ties", dict(density=0.5), (6, 4), 1), ("ties", dict(density=0.5), BIG, 1), ("ties", dict(density=0.5), BIG, -1),
    ("tsv_m", {}, (6, 4), 1), ("task_arithmetic", {}, (6, 4), 1)])
def test_nonfinite_input_stops_the_merge_and_writes_nothing(tmp_path, monkeypatch, method, params, shape, bad):
  """TIES used to drop the NaN silently (no sign agrees with NaN: the base value was written). A large TIES
  tensor is checked by the cuts' native pass, which must name the same input."""
  _, files = _nonfinite_family(tmp_path, bad, shape)
  spec = mf.spec(method, files[0], files[1:], params)
  seen, real = [], host_topk.host_cuts_checked
  monkeypatch.setattr(host_topk, "host_cuts_checked", lambda *a: seen.append(real(*a)) or seen[-1])
  with pytest.raises(driver.MergeError) as e:
    driver.run_merge(spec, tmp_path / "out", progress=False)
  if shape == BIG and tau_select.supported(np.zeros(1, np.float32), np.zeros(1, np.float32)):
    assert [r[2] for r in seen].count(False) == 1  # the native pass found it
  msg = str(e.value)
  assert msg.startswith(f"{method}: input tensor 'w_a' of {files[bad + 1]} has 1 NaN and 1 inf entries")
  assert "nothing was written" in msg and "\n" not in msg
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("shape", [(6, 4), BIG])
def test_nonfinite_keep_base_writes_the_base_tensor_and_reports_it(tmp_path, shape):
  base, files = _nonfinite_family(tmp_path, shape=shape)
  logs = []
  rep = driver.run_merge(mf.spec("ties", files[0], files[1:], dict(density=0.5)), tmp_path / "out",
                         progress=False, nonfinite="keep_base", log=logs.append)
  out = mf.read_tensors(tmp_path / "out")
  np.testing.assert_array_equal(out["w_a"], base["w_a"])
  assert not np.array_equal(out["w_b"], base["w_b"]) and np.isfinite(out["w_b"]).all()
  assert rep["nonfinite_kept_base"] == ["w_a"]
  assert any("w_a" in line and "kept the base's tensor" in line for line in logs)
  with pytest.raises(driver.MergeError, match="nonfinite must be one of"):
    driver.run_merge(mf.spec("ties", files[0], files[1:]), tmp_path / "o2", progress=False, nonfinite="zero")


def test_nonfinite_merged_tensor_stops_the_merge(tmp_path):
  """Finite inputs whose merge is not finite: linear, weights 1 + 1 unnormalised, out_dtype
  float16 overflows (4e4 + 4e4 > 65504)."""
  files = []
  for i in range(2):
    files.append(str(tmp_path / f"m{i}.safetensors"))
    save_file({"w": np.full((3, 2), 4e4, np.float32), "v": np.ones((3,), np.float32)}, files[-1])
  spec = mf.spec("linear", None, files, dict(normalize=False), model_params=[{"weight": 1.0}] * 2,
               out_dtype="float16")
  with pytest.raises(driver.MergeError, match=r"^linear: merged tensor 'w' has 0 NaN and 6 inf entries; "
                                              r"nothing was written"):
    driver.run_merge(spec, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()
  rep = driver.run_merge(spec, tmp_path / "out", progress=False, nonfinite="keep_base")
  out = mf.read_tensors(tmp_path / "out")
  np.testing.assert_array_equal(out["w"], np.full((3, 2), 4e4))  # the first model's (no base)
  np.testing.assert_array_equal(out["v"], 2 * np.ones(3))
  assert rep["nonfinite_kept_base"] == ["w"]
