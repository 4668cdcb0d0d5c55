"""Load an HF Llama/Mistral/Qwen2/Mixtral folder into a params tree, tensor by tensor.

Each params leaf is assembled in a 64-byte-aligned host buffer of its final dtype,
filled one HF tensor at a time, then handed to `jax.device_put(may_alias=True)`:
on CPU the device array aliases the buffer (no second copy), on an accelerator
or with a sharding the buffer is freed after transfer. Host memory therefore
peaks at the result plus one HF tensor.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable, Optional, Tuple, Union

import jax
import numpy as np
from absl import logging

from h3jax import progress as progress_lib
from h3jax.config import ModelConfig, resolve_dtype
from h3jax.hf import config_io, keymap, st_io
from h3jax.model import params as params_lib

ShardingSpec = Union[None, jax.sharding.Sharding, dict, Callable[[tuple, tuple], jax.sharding.Sharding]]


def read_hf_config(path) -> dict:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"model folder not found: {path}")
  cfg_path = path / "config.json"
  if not cfg_path.exists():
    raise FileNotFoundError(f"{path} has no config.json; expected an HF model folder "
                            "(config.json + model.safetensors or a sharded index)")
  try:
    return json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None


def load_config(path, dtype: Optional[str] = None) -> Tuple[ModelConfig, str]:
  """(ModelConfig, param dtype name) of an HF folder, checked strictly."""
  hf = read_hf_config(path)
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
  resolve_dtype(dtype)
  return config_io.hf_config_to_model_config(hf, dtype=dtype), dtype


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """np.empty whose data pointer is `align`-byte aligned (XLA:CPU can then alias it)."""
  dtype = np.dtype(dtype)
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(n + align, np.uint8)
  off = (-raw.ctypes.data) % align
  return raw[off:off + n].view(dtype).reshape(shape)


def _sharding_for(shardings: ShardingSpec, path: tuple, shape: tuple):
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if callable(shardings):
    return shardings(path, shape)
  node = shardings
  for k in path:
    if not isinstance(node, dict) or k not in node:
      raise KeyError(f"shardings tree has no entry for {'/'.join(path)}")
    node = node[k]
  return node


def _sources(cfg: ModelConfig, reader: st_io.SafetensorsReader):
  """leaf path -> [(leaf index, HF name, transpose, slice of HF dim -2 or None)]."""
  fused = cfg.is_moe and "model.layers.0.mlp.experts.gate_up_proj" in reader
  out = {}
  for row in keymap.rows(cfg):
    if fused and row.only == "moe":
      for l in range(cfg.num_layers):
        name, sl = keymap.fused_moe_sources(cfg, l)[row.path]
        out.setdefault(row.path, []).append(((l,), name, True, sl))
      continue
    for idx, name in keymap.expand(row, cfg):
      out.setdefault(row.path, []).append((idx, name, row.transpose, None))
  return out


def _check_keys(cfg, reader, sources, path):
  expected = {name for srcs in sources.values() for _, name, _, _ in srcs}
  present = set(reader.keys())
  missing = sorted(expected - present)
  extra = sorted(k for k in present - expected if not keymap.IGNORED.fullmatch(k))
  if cfg.tie_word_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")  # some tied checkpoints still carry a copy
  if missing:
    raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s) the config requires, "
                     f"e.g. {missing[:3]}")
  if extra:
    raise ValueError(f"{path}: checkpoint has {len(extra)} tensor(s) h3jax does not know, e.g. {extra[:3]}")


def load_pretrained(path, dtype: Optional[str] = None, shardings: ShardingSpec = None,
                    *, progress: bool = False) -> Tuple[ModelConfig, dict]:
  """Reads an HF folder -> (cfg, params). `dtype`: param + compute dtype
  ('float32' | 'bfloat16' | 'float16'; default: the checkpoint's). `shardings`: one
  Sharding for every leaf, a tree of them shaped like params, or a function
  (path tuple, shape) -> Sharding; each leaf is placed there as it is read."""
  path = pathlib.Path(path)
  if dtype is not None:
    resolve_dtype(dtype)
  cfg, dtype = load_config(path, dtype)
  np_dtype = np.dtype(resolve_dtype(dtype))
  shapes = params_lib.param_shapes(cfg)
  with st_io.SafetensorsReader(path) as reader:
    sources = _sources(cfg, reader)
    _check_keys(cfg, reader, sources, path)
    params = {}
    items = list(sources.items())
    items = progress_lib.bar(items, desc=f"load {path.name}", unit="leaf", enabled=progress)
    for leaf_path, srcs in items:
      shape = _leaf_shape(shapes, leaf_path)
      buf = aligned_empty(shape, np_dtype)
      for idx, name, transpose, sl in srcs:
        t = reader.get(name)
        if sl is not None:
          t = t[:, sl[0]:sl[1]]
        if transpose:
          t = np.swapaxes(t, -1, -2)
        if t.shape != buf[idx].shape:
          raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)} but the config implies "
                           f"{tuple(np.swapaxes(buf[idx], -1, -2).shape if transpose else buf[idx].shape)}")
        buf[idx] = t
        del t
      sharding = _sharding_for(shardings, leaf_path, shape)
      leaf = jax.device_put(buf, sharding, may_alias=True)  # sharding None: default device
      leaf.block_until_ready()  # an in-flight transfer may hold a second copy of buf
      del buf
      node = params
      for k in leaf_path[:-1]:
        node = node.setdefault(k, {})
      node[leaf_path[-1]] = leaf
  logging.info("loaded %s: %s, %d params, %s", path, cfg.architecture, params_lib.num_params(params), dtype)
  return cfg, params


def _leaf_shape(shapes: dict, path: tuple) -> tuple:
  node = shapes
  for k in path:
    node = node[k]
  return node
