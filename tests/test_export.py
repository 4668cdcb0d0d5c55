"""`python -m h3jax.export`: Orbax checkpoint -> HF folder, bit-identical to the source tensors."""

import os
import pathlib
import subprocess
import sys

import numpy as np

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


def _export(tmp_path, *args):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}
  return subprocess.run([sys.executable, "-m", "h3jax.export", *args], capture_output=True, text=True, env=env,
                        cwd=pathlib.Path(__file__).resolve().parents[1])


def test_export_logs_only_progress_unless_verbosity_is_given(tmp_path):
  import re
  src = save_model(make_model("llama_gqa_linear"), tmp_path / "src")
  cfg, params = h3jax.load_pretrained(src)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(3, params=params, config=cfg)
  absl_info = re.compile(r"^I\d{4} ", re.M)  # absl's INFO line prefix (Orbax logs through absl)
  quiet = _export(tmp_path, f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'a'}")
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  assert not absl_info.search(quiet.stderr), quiet.stderr[:2000]
  assert f"exporting step 3 of {tmp_path / 'ckpt'}" in quiet.stderr
  loud = _export(tmp_path, f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'b'}", "--verbosity=0")
  assert loud.returncode == 0 and len(absl_info.findall(loud.stderr)) >= 5


def test_mistyped_checkpoint_is_one_error_line_and_creates_nothing(tmp_path):
  run = _export(tmp_path, f"--checkpoint={tmp_path / 'chekpoints'}", f"--out={tmp_path / 'hf'}")
  assert run.returncode == 2, run.stderr[-3000:]
  assert run.stderr.strip().splitlines() == [
      f"error: checkpoint folder not found: {tmp_path / 'chekpoints'} (pass the run's checkpoints/ folder, "
      f"e.g. runs/NAME/checkpoints)"]
  assert os.listdir(tmp_path) == []  # neither the mistyped checkpoint folder nor --out


def test_a_recorded_tokenizer_folder_that_is_gone_is_one_error_line_before_writing(tmp_path):
  """A run moved to another machine records a tokenizer folder that is not there: the export names it and
  the flag that replaces it before writing anything, instead of failing after the tensors."""
  src = save_model(make_model("llama_gqa_linear"), tmp_path / "src")
  cfg, params = h3jax.load_pretrained(src)
  gone = tmp_path / "elsewhere" / "smollm2"
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(3, params=params, config=cfg, extra={"tokenizer_source": str(gone)})
  run = _export(tmp_path, f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'hf'}")
  assert run.returncode == 2, run.stderr[-3000:]
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: the checkpoint's tokenizer folder {gone} (recorded when it was trained) is not here; pass "
      f"--tokenizer_source DIR (a folder with the tokenizer files)")
  assert not (tmp_path / "hf").exists()
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text("{}")
  ok = _export(tmp_path, f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'hf'}", f"--tokenizer_source={tok}")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
  peft = _export(tmp_path, f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'peft'}", "--format=peft")
  assert peft.returncode == 2 and peft.stderr.strip().splitlines()[-1].endswith("pass --base DIR (the base model)")
  assert not (tmp_path / "peft").exists()
