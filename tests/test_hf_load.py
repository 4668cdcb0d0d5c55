"""Loading HF folders: sharded checkpoints, placement on shardings, peak host memory, bad input."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import h3jax
from h3jax.hf import config_io, st_io
from tiny_hf import make_model, save_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = make_model("llama_gqa_linear")
  single = save_model(model, tmp_path_factory.mktemp("single"))
  sharded = tmp_path_factory.mktemp("sharded")
  model.save_pretrained(sharded, max_shard_size="40KB")
  return model, single, str(sharded)


def test_sharded_equals_single_file(tiny):
  _, single, sharded = tiny
  assert os.path.exists(os.path.join(sharded, st_io.INDEX_NAME))
  _, a = h3jax.load_pretrained(single)
  cfg, b = h3jax.load_pretrained(sharded)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
  assert cfg.num_kv_heads == 2


def test_tensors_equal_the_torch_state_dict(tiny):
  model, single, _ = tiny
  _, p = h3jax.load_pretrained(single)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  np.testing.assert_array_equal(p["layers"]["attn"]["k_proj"]["kernel"][1],
                                sd["model.layers.1.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(p["embed"]["embedding"], sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(p["lm_head"]["kernel"], sd["lm_head.weight"].T)


def test_dtype_conversion(tiny):
  _, single, _ = tiny
  cfg, p = h3jax.load_pretrained(single, dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(p))


def test_places_each_leaf_on_the_requested_sharding(tiny):
  _, _, sharded = tiny
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  P = jax.sharding.PartitionSpec

  def rule(path, shape):  # shard the output dim of 3-D stacked kernels over `model`
    spec = P(None, None, "model") if path[-1] == "kernel" and len(shape) == 3 else P()
    return jax.sharding.NamedSharding(mesh, spec)

  _, p = h3jax.load_pretrained(sharded, shardings=rule)
  q = p["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, None, "model") and len(q.addressable_shards) == 8
  assert p["embed"]["embedding"].sharding.spec == P()
  _, ref = h3jax.load_pretrained(sharded)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(ref["layers"]["attn"]["q_proj"]["kernel"]))


_PEAK = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  jax.numpy.zeros(1).block_until_ready()
  from h3jax.hf import load
  def rss_mb(field="VmRSS"):
    line = [l for l in open("/proc/self/status") if l.startswith(field)][0]
    return int(line.split()[1]) / 1024
  open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM)
  base = rss_mb()
  cfg, params = load.load_pretrained(sys.argv[1])
  jax.block_until_ready(params)
  peak = rss_mb("VmHWM")
  print(json.dumps({"base": base, "peak": peak, "after": rss_mb()}))
""")


def test_peak_host_memory_is_result_plus_about_one_tensor(tmp_path):
  # V*D = 32 MB per embedding/lm_head tensor, 8 layers of 2-4 MB tensors: 96 MB result in 6 shards.
  cfg = h3jax.ModelConfig(vocab_size=16384, hidden_size=512, intermediate_size=1024, num_layers=8,
                          num_heads=8, num_kv_heads=8, head_dim=64)
  from h3jax.hf import keymap
  rng = np.random.default_rng(0)
  w = st_io.SafetensorsWriter(tmp_path, max_shard_size="20MB")
  largest = total = 0
  for name, (row, idx) in keymap.hf_names(cfg).items():
    shape = _hf_shape(cfg, row, idx)
    t = rng.standard_normal(shape, dtype=np.float32)
    w.add(name, t)
    largest, total = max(largest, t.nbytes), total + t.nbytes
  assert len(w.close()) >= 5
  (tmp_path / "config.json").write_text(json.dumps(config_io.model_config_to_hf(cfg)))
  out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"})
  m = json.loads(out.stdout.strip().splitlines()[-1])
  mb = 2**20
  grown = m["peak"] - m["base"]
  # Result + one HF tensor (+ its transpose) + allocator slack; a load-everything-then-convert
  # loader would need >= 2x the result.
  assert grown <= (total + 2 * largest) / mb + 24, (m, total / mb, largest / mb)
  assert grown >= total / mb * 0.9  # the measurement sees the result at all


def _hf_shape(cfg, row, idx):
  from h3jax.model import params as params_lib
  node = params_lib.param_shapes(cfg)
  for k in row.path:
    node = node[k]
  shape = node[len(idx):]
  return shape[::-1] if row.transpose else shape


def test_missing_folder():
  with pytest.raises(FileNotFoundError, match="model folder not found: /nonexistent/model"):
    h3jax.load_pretrained("/nonexistent/model")


def test_unsupported_architecture(tiny, tmp_path):
  _, single, _ = tiny
  bad = _copy(single, tmp_path)
  _edit_config(bad, architectures=["GPTNeoXForCausalLM"])
  with pytest.raises(config_io.UnsupportedConfigError, match="unsupported architecture \\['GPTNeoXForCausalLM'\\]"):
    h3jax.load_pretrained(bad)


def test_unknown_config_attribute(tiny, tmp_path):
  bad = _copy(tiny[1], tmp_path)
  _edit_config(bad, attn_logit_softcapping=30.0)
  with pytest.raises(config_io.UnsupportedConfigError, match="attn_logit_softcapping"):
    h3jax.load_pretrained(bad)


def test_truncated_safetensors(tiny, tmp_path):
  bad = _copy(tiny[1], tmp_path)
  f = bad / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(st_io.SafetensorsError, match="truncated: tensor .* \\(incomplete download\\?\\)"):
    h3jax.load_pretrained(bad)


def test_dtype_typo(tiny):
  with pytest.raises(ValueError, match="unknown dtype 'bfloat61'"):
    h3jax.load_pretrained(tiny[1], dtype="bfloat61")


def test_shape_disagreeing_with_config(tiny, tmp_path):
  bad = _copy(tiny[1], tmp_path)
  _edit_config(bad, intermediate_size=100)
  with pytest.raises(ValueError, match="has shape .* but the config implies"):
    h3jax.load_pretrained(bad)


def _copy(src, dst):
  import shutil
  out = dst / "m"
  shutil.copytree(src, out)
  return out


def _edit_config(path, **kw):
  p = path / "config.json"
  p.write_text(json.dumps({**json.loads(p.read_text()), **kw}))
