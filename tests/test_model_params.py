"""Params-tree helpers in h3jax.model.params: flatten_dict / unflatten_dict (flax.traverse_util's, without flax)."""

import numpy as np
from jax.sharding import PartitionSpec as P

from h3jax.model.params import flatten_dict, unflatten_dict


def test_flatten_round_trip_keeps_order_and_drops_empty_dicts():
  tree = {"embed": {"embedding": np.zeros(2)}, "layers": {"attn": {"q_proj": {"kernel": 1, "bias": 2}}, "mlp": {}},
          "spec": P(None, "model")}  # a PartitionSpec (a tuple) is a leaf
  flat = flatten_dict(tree)
  assert list(flat) == [("embed", "embedding"), ("layers", "attn", "q_proj", "kernel"),
                        ("layers", "attn", "q_proj", "bias"), ("spec",)]
  assert flat[("spec",)] == P(None, "model")
  back = unflatten_dict(flat)
  assert list(back["layers"]) == ["attn"] and back["layers"]["attn"]["q_proj"] == {"kernel": 1, "bias": 2}
  assert flatten_dict({}) == {} and unflatten_dict({}) == {}
