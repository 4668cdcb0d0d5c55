"""Orbax checkpoints: exact restore (params, optimizer state, extra, config), retention, shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import h3jax
from h3jax import checkpoint
from h3jax.model import params as params_lib

CFG = h3jax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, expert_names=("a", "b"), eos_token_id=(2, 5))


def _equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(
      jax.tree.map(lambda x, y: x.dtype == y.dtype and bool((np.asarray(x) == np.asarray(y)).all()), a, b))


def _state():
  params = params_lib.init_params(CFG, jax.random.PRNGKey(0))
  opt = optax.adamw(1e-3)
  opt_state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  return params, opt_state


def test_save_restore_is_exact_and_keeps_last_n(tmp_path):
  params, opt_state = _state()
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (10, 20, 30):
      ckpt.save(step, params=params, opt_state=opt_state, config=CFG, extra={"data": {"epoch": 1, "pos": step}})
    ckpt.wait()
    assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
    out = ckpt.restore(params_like=params, opt_state_like=opt_state)
    assert out["step"] == 30 and out["extra"] == {"data": {"epoch": 1, "pos": 30}} and out["config"] == CFG
    assert _equal(out["params"], params) and _equal(out["opt_state"], opt_state)
    assert ckpt.restore(20)["extra"]["data"]["pos"] == 20
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 10"):
      ckpt.restore(10)


def test_restore_onto_a_sharding(tmp_path):
  params, _ = _state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, params=params, config=CFG)
    ckpt.wait()
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "model"))
    like = checkpoint.abstract_like(CFG)
    like["layers"]["mlp"]["up_proj"]["kernel"] = jax.ShapeDtypeStruct((2, 32, 48), jnp.float32, sharding=sh)
    out = ckpt.restore(params_like=like)
  up = out["params"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert up.sharding == sh and len(up.addressable_shards) == 8
  assert _equal(out["params"], params)


def test_load_params_and_missing_dir(tmp_path):
  params, _ = _state()
  with checkpoint.Checkpointer(tmp_path / "run") as ckpt:
    ckpt.save(5, params=params, config=CFG)
  cfg, got = checkpoint.load_params(tmp_path / "run")
  assert cfg == CFG and _equal(got, params)
  with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
    checkpoint.load_params(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    checkpoint.Checkpointer(tmp_path / "empty").restore()
