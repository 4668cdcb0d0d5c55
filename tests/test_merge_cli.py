"""`python -m h3jax.merge`: end to end, and one clear error (nothing written) per bad input."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

import merge_fixtures as mf
from h3jax.merging.streaming import MergeConfigError, MergeError, merge_from_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  base, models, cfg = mf.llama_family(root / "llama", 2, tied=False, seed=4)
  return root, base, models


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  return subprocess.run([sys.executable, "-m", "h3jax.merge", *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=600)


def test_cli_mergekit_yaml_end_to_end(fam, tmp_path):
  root, base, models = fam
  cfg = tmp_path / "ties.yaml"
  cfg.write_text(yaml.safe_dump(dict(
      merge_method="ties", base_model=base, dtype="float32", tokenizer_source="base",
      models=[dict(model=m, parameters=dict(weight=1.0, density=0.4)) for m in models],
      parameters=dict(normalize=True, int8_mask=True, **{"lambda": 1.0}))))
  r = _cli(f"--config={cfg}", f"--out={tmp_path / 'out'}", f"--compilation_cache={tmp_path / 'xla'}",
           "--devices=2")  # two CPU devices, tensors round-robin: the same bytes as one device
  assert r.returncode == 0, r.stderr[-3000:]
  assert any((tmp_path / "xla").iterdir())  # compiled kernels persisted for the next run
  assert "merge" in r.stderr and "tensor" in r.stderr  # the per-tensor progress bar
  out = mf.read_tensors(tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == mf.LLAMA["hidden_size"]
  merge_from_config(str(cfg), str(tmp_path / "lib"), progress=False)
  lib = mf.read_tensors(tmp_path / "lib")
  assert sorted(out) == sorted(lib) and all(np.array_equal(out[k], lib[k]) for k in out)
  # The output exists already: refused without --overwrite, replaced with it.
  r = _cli(f"--config={cfg}", f"--out={tmp_path / 'out'}", "--noprogress")
  assert r.returncode == 2 and "already exists" in r.stderr
  assert _cli(f"--config={cfg}", f"--out={tmp_path / 'out'}", "--overwrite", "--noprogress").returncode == 0


def test_cli_py_config_takes_dotted_overrides(fam, tmp_path):
  """`--config.x=VALUE` overrides a `.py` merge config's fields, as in train / evaluate; a YAML takes none."""
  root, base, models = fam
  cfg = tmp_path / "lin.py"
  cfg.write_text(f"""
import ml_collections
def get_config():
  return ml_collections.ConfigDict(dict(merge_method="linear", out_dtype="float32",
      models=[dict(model=m, parameters=dict(weight=1.0)) for m in {models!r}]))
""")
  r = _cli(f"--config={cfg}", "--config.out_dtype=bfloat16", f"--out={tmp_path / 'out'}", "--noprogress")
  assert r.returncode == 0, r.stderr[-3000:]
  from safetensors import safe_open
  with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  yml = tmp_path / "lin.yaml"
  yml.write_text(yaml.safe_dump(dict(merge_method="linear", models=[dict(model=m, parameters=dict(weight=1.0))
                                                                    for m in models])))
  r = _cli(f"--config={yml}", "--config.dtype=float32", f"--out={tmp_path / 'out2'}", "--noprogress")
  assert r.returncode != 0 and "overrides apply to a .py config only" in r.stderr
  assert not (tmp_path / "out2").exists()


def test_cli_unknown_method_is_one_clear_error(fam, tmp_path):
  root, base, models = fam
  cfg = tmp_path / "bad.yaml"
  cfg.write_text(yaml.safe_dump(dict(merge_method="frankenmerge", base_model=base,
                                     models=[dict(model=m) for m in models])))
  r = _cli(f"--config={cfg}", f"--out={tmp_path / 'out'}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "unknown merge_method 'frankenmerge'" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "out").exists()


def _mk(base, models, method="ties", params=None, model_params=None, **top):
  per_model = dict(weight=1.0) if model_params is None else model_params
  body = dict(merge_method=method, models=[dict(model=m, parameters=dict(per_model)) for m in models], **top)
  if base is not None:
    body["base_model"] = base
  if params is not None:
    body["parameters"] = params
  return body


def _zero_sum(base, models, method, **top):
  body = dict(merge_method=method, dtype="float32",
              models=[dict(model=m, parameters=dict(weight=w)) for m, w in zip(models, (1.0, -1.0))], **top)
  return body if base is None else dict(body, base_model=base)


def test_cli_zero_weight_sum_is_an_error_and_unnormalized_difference_is_not(fam, tmp_path):
  root, base, models = fam
  cfg = tmp_path / "lin.yaml"
  cfg.write_text(yaml.safe_dump(_zero_sum(None, models, "linear")))
  r = _cli(f"--config={cfg}", f"--out={tmp_path / 'out'}", "--noprogress")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: linear with normalize")
  assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
  # task_arithmetic without normalize (its default): a difference of task vectors, finite and allowed
  cfg.write_text(yaml.safe_dump(_zero_sum(base, models, "task_arithmetic")))
  merge_from_config(str(cfg), str(tmp_path / "ta"), progress=False)
  out, b, m0, m1 = (mf.read_tensors(p) for p in (tmp_path / "ta", base, *models))
  k = "model.layers.0.mlp.up_proj.weight"
  np.testing.assert_allclose(out[k], b[k] + (m0[k] - b[k]) - (m1[k] - b[k]), rtol=1e-5,
                             atol=1e-6 * np.abs(b[k]).max())


def _other_arch(root):
  cfg = mf.llama_config(False, hidden_size=16, head_dim=4)
  return mf.write_llama(root / "other_arch", mf.random_base(mf.llama_shapes(cfg), 1), cfg)


def _other_shape(root):
  """Same config.json, one tensor with another shape (a corrupt or mislabelled expert)."""
  cfg = mf.llama_config(False)
  t = mf.random_base(mf.llama_shapes(cfg), 2)
  t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:40]
  return mf.write_llama(root / "other_shape", t, cfg)


def _corrupt(root, model, how):
  """A copy of `model` whose model.safetensors is truncated / has a JSON-list header / a negative shape."""
  import shutil
  import struct
  d = root / f"corrupt_{how}"
  if not d.exists():
    shutil.copytree(model, d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if how == "truncated":
      f.write_bytes(raw[:len(raw) // 2])
    elif how == "list_header":
      f.write_bytes(struct.pack("<Q", 6) + b"[1, 2]" + raw[8 + n:])
    else:  # negate one tensor's dims: their product, hence the byte count, is unchanged
      header = json.loads(raw[8:8 + n])
      name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
      header[name]["shape"] = [-d for d in header[name]["shape"]]
      h = json.dumps(header).encode().ljust(n)
      f.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])
  return str(d)


def _dup_key_yaml(b, ms):
  return ("yaml", f"merge_method: ties\nbase_model: {b}\nmodels:\n"
          + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for m in ms)
          + "merge_method: linear\n")


# id -> (builder(root, base, models) -> config dict, .py source or ("yaml", text), error type, message)
BAD = {
    "different_architectures": (lambda r, b, ms: _mk(b, [ms[0], _other_arch(r)]), MergeError,
                                "models have different architectures: hidden_size"),
    "different_shapes": (lambda r, b, ms: _mk(b, [ms[0], _other_shape(r)]), MergeError,
                         "models have different shapes for model.layers.1.mlp.up_proj.weight"),
    "missing_base": (lambda r, b, ms: _mk(None, ms), MergeConfigError, "ties needs a base_model"),
    "density_zero": (lambda r, b, ms: _mk(b, ms, model_params=dict(weight=1.0, density=0.0)), MergeError,
                     "density must be in (0, 1]"),
    "density_above_one": (lambda r, b, ms: _mk(b, ms, "dare_linear", dict(density=1.5)),
                          MergeError, "density must be in (0, 1], got 1.5"),
    "unknown_method": (lambda r, b, ms: _mk(b, ms, "frankenmerge"), MergeConfigError,
                       "unknown merge_method 'frankenmerge'"),
    "unknown_top_level_key": (lambda r, b, ms: _mk(b, ms, merge_options=dict(x=1)), MergeConfigError,
                              "unknown top-level key(s) ['merge_options']"),
    "unknown_parameter": (lambda r, b, ms: _mk(b, ms, params=dict(densty=0.5)), MergeConfigError,
                          "unknown parameter 'densty' for ties"),
    "global_param_on_model": (lambda r, b, ms: _mk(b, ms, model_params=dict(weight=1.0, normalize=True)),
                              MergeConfigError, "put it under the top-level 'parameters'"),
    "missing_weight": (lambda r, b, ms: _mk(b, ms, "task_arithmetic", model_params={}), MergeConfigError,
                       "missing required parameter 'weight'"),
    "slices": (lambda r, b, ms: dict(merge_method="ties", base_model=b, slices=[]), MergeConfigError,
               "'slices' is implemented for merge_method: passthrough only"),
    "slices_two_sources": (lambda r, b, ms: dict(merge_method="passthrough", slices=[dict(sources=[
        dict(model=ms[0], layer_range=[0, 1]), dict(model=ms[1], layer_range=[0, 1])])]), MergeConfigError,
        "merging inside a slice is not implemented"),
    "slices_out_of_range": (lambda r, b, ms: dict(merge_method="passthrough", slices=[dict(sources=[
        dict(model=ms[0], layer_range=[2, 9])])]), MergeError, "outside"),
    "missing_model_folder": (lambda r, b, ms: _mk(b, [ms[0], str(r / "nope")]), MergeError, "input not found"),
    "slerp_two_models": (lambda r, b, ms: _mk(b, ms, "slerp", dict(t=0.5), {}), MergeConfigError,
                         "slerp needs a base_model and exactly one other model"),
    # Issue 11 item 3: a normalized merge whose weights sum to zero was 100% +-inf output, exit 0.
    "linear_weights_sum_to_zero": (lambda r, b, ms: _zero_sum(None, ms, "linear"), MergeError,
                                   "sum to 0, so the normalized merge divides by zero"),
    "task_arithmetic_normalized_weights_sum_to_zero": (
        lambda r, b, ms: _zero_sum(b, ms, "task_arithmetic", parameters=dict(normalize=True)), MergeError,
        "sum to 0, so the normalized merge divides by zero"),
    "py_unknown_knob": (lambda r, b, ms: f"""
import ml_collections
def get_config():
  return ml_collections.ConfigDict(dict(merge_method="tsv_m", base_model={b!r},
      models=[dict(model=m) for m in {ms!r}], parameters=dict(alpha=1.0, rank_ration=0.5)))
""", MergeConfigError, "unknown parameter 'rank_ration' for h3jax method tsv_m"),
    "della_impossible_epsilon": (lambda r, b, ms: _mk(b, ms, "della", dict(epsilon=0.9),
                                                      dict(weight=1.0, density=0.5)), MergeError,
                                 "epsilon must be >= 0 with density +/- epsilon in (0, 1)"),
    "only_model_is_the_base": (lambda r, b, ms: _mk(b, [b], model_params=dict(weight=1.0, density=0.5)),
                               MergeConfigError, "the only model listed is the base_model"),
    "breadcrumbs_negative_gamma": (lambda r, b, ms: _mk(b, ms, "breadcrumbs", dict(gamma=-0.1),
                                                        dict(weight=1.0, density=0.5)), MergeError,
                                   "gamma (the fraction of largest task-vector entries dropped) must be in [0, 1)"),
    "yaml_duplicate_key": (lambda r, b, ms: _dup_key_yaml(b, ms), MergeConfigError,
                           "duplicate key 'merge_method' (PyYAML would keep the last one silently) at line 8"),
    "truncated_safetensors": (lambda r, b, ms: _mk(b, [ms[0], _corrupt(r, ms[1], "truncated")]), MergeError,
                              "corrupt_truncated/model.safetensors: truncated: tensor"),
    "header_is_a_json_list": (lambda r, b, ms: _mk(b, [ms[0], _corrupt(r, ms[1], "list_header")]), MergeError,
                              "corrupt_list_header/model.safetensors: corrupt safetensors header (a JSON list"),
    "negative_shape": (lambda r, b, ms: _mk(b, [ms[0], _corrupt(r, ms[1], "negative")]), MergeError,
                       "dimensions must be integers >= 0"),
    "py_emr_not_streamable": (lambda r, b, ms: f"""
def get_config():
  return dict(merge_method="emr", base_model={b!r}, models=[dict(model=m) for m in {ms!r}])
""", MergeError, "emr cannot be run by the file-to-file driver"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_clear_error_nothing_written(fam, tmp_path, case):
  root, base, models = fam
  build, err, msg = BAD[case]
  body = build(root, base, models)
  cfg = tmp_path / ("cfg.py" if isinstance(body, str) else "cfg.yaml")
  cfg.write_text(body if isinstance(body, str) else body[1] if isinstance(body, tuple) else yaml.safe_dump(body))
  out_parent = tmp_path / "outs"
  out_parent.mkdir()
  with pytest.raises(err) as e:
    merge_from_config(str(cfg), str(out_parent / "merged"), progress=False)
  assert msg in str(e.value)
  assert os.listdir(out_parent) == []  # neither the output nor a temporary folder


@pytest.mark.parametrize("case", ["truncated_safetensors", "della_impossible_epsilon", "yaml_duplicate_key"])
def test_cli_bad_input_is_one_error_line_exit_2(fam, tmp_path, case):
  root, base, models = fam
  body = BAD[case][0](root, base, models)
  cfg = tmp_path / "cfg.yaml"
  cfg.write_text(body[1] if isinstance(body, tuple) else yaml.safe_dump(body))
  r = _cli(f"--config={cfg}", f"--out={tmp_path / 'out'}", "--noprogress")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
  assert BAD[case][2] in r.stderr
  assert sorted(os.listdir(tmp_path)) == ["cfg.yaml"]


def test_tokenizer_comes_from_the_base_else_a_model_else_a_warning(fam, tmp_path, capsys):
  """A merged folder without tokenizer files only fails later, in generate: say so at merge time, and
  take a model's tokenizer when the base has none."""
  import shutil
  root, base, models = fam
  cfg = tmp_path / "cfg.yaml"
  cfg.write_text(yaml.safe_dump(_mk(base, models, model_params=dict(weight=1.0, density=0.5))))
  capsys.readouterr()
  merge_from_config(str(cfg), str(tmp_path / "none"), progress=False)
  assert "warning: no input has tokenizer files" in capsys.readouterr().err
  assert not (tmp_path / "none" / "tokenizer.json").exists()
  with_tok = tmp_path / "m1_tok"
  shutil.copytree(models[1], with_tok)
  (with_tok / "tokenizer.json").write_text('{"model": "m1"}')
  (with_tok / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
  cfg.write_text(yaml.safe_dump(_mk(base, [models[0], str(with_tok)], model_params=dict(weight=1.0, density=0.5))))
  merge_from_config(str(cfg), str(tmp_path / "from_model"), progress=False)
  assert f"{base} has no tokenizer files; the merged folder gets {with_tok}'s" in capsys.readouterr().err
  assert (tmp_path / "from_model" / "tokenizer.json").read_text() == '{"model": "m1"}'
  assert (tmp_path / "from_model" / "tokenizer_config.json").exists()
