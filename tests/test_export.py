"""`python -m h3jax.export`: Orbax checkpoint -> HF folder, bit-identical to the source tensors."""

import os
import subprocess
import sys

import numpy as np
import pytest

import h3jax
from h3jax import checkpoint
from h3jax.hf import st_io
from tiny_hf import make_model, save_model


def test_orbax_save_restore_export_is_bit_identical(tmp_path):
  src = save_model(make_model("llama_gqa_tied_llama3"), tmp_path / "src")
  cfg, params = h3jax.load_pretrained(src)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(7, params=params, config=cfg, extra={"tokenizer_source": None})
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
  run = subprocess.run([sys.executable, "-m", "h3jax.export", f"--checkpoint={tmp_path / 'ckpt'}",
                        f"--out={tmp_path / 'hf'}"], capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  with st_io.SafetensorsReader(src) as a, st_io.SafetensorsReader(tmp_path / "hf") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)
  again = subprocess.run([sys.executable, "-m", "h3jax.export", f"--checkpoint={tmp_path / 'ckpt'}",
                          f"--out={tmp_path / 'hf'}"], capture_output=True, text=True, env=env)
  assert again.returncode != 0 and "exists and is not empty; pass --overwrite" in again.stderr
