"""Greedy generation with sharded params (expert parallel over data x expert, tensor parallel) gives
the same tokens as one device."""

import jax
import numpy as np
import pytest

from h3jax.config import ModelConfig
from h3jax.generation import generate_tokens
from h3jax.model import params as params_lib
from h3jax.train import sharding


def _model(E):
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, max_position_embeddings=64, num_experts=E, num_experts_per_tok=2 if E else 1,
                    moe_dispatch="capacity", capacity_factor=0.0)
  return cfg, params_lib.init_params(cfg, jax.random.key(3), std=0.3)


def _prompts(B=8, P=6):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 64, (B, P)).astype(np.int32)
  mask = np.ones((B, P), np.int32)
  mask[1, :2] = mask[5, :4] = 0  # left padding
  return np.where(mask > 0, ids, 0), mask


@pytest.mark.parametrize("E,mesh,dispatch", [
    (4, dict(data=2, expert=4), "expert_parallel"),
    (4, dict(fsdp=2, expert=2, tensor=2), "expert_parallel"),
    (0, dict(data=4, tensor=2), None),
])
def test_sharded_greedy_tokens_equal_one_device(E, mesh, dispatch):
  cfg, params = _model(E)
  ids, mask = _prompts()
  want, want_len = generate_tokens(params, cfg, ids, mask, max_new_tokens=8)
  m = sharding.make_mesh(**mesh)
  sharded = jax.device_put(params, sharding.param_shardings(params, m))
  c = cfg.replace(moe_dispatch=dispatch) if dispatch else cfg
  with jax.set_mesh(m):  # expert_parallel finds the `expert` axis here
    got, got_len = generate_tokens(sharded, c, ids, mask, max_new_tokens=8)
  if E:
    assert sharded["layers"]["moe"]["experts"]["up_proj"]["kernel"].sharding.spec[1] == "expert"
  else:
    assert sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, None, "tensor")
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_len, want_len)
  assert len(set(want[:, 0].tolist())) > 1  # not a degenerate constant output
