"""`h3jax.hf.loader`: one load_model for HF folders, checkpoints and workdirs; one tokenizer lookup."""

import jax
import numpy as np
import pytest

import h3jax
from h3jax import checkpoint
from h3jax.hf import loader
from h3jax.model import params as params_lib

CFG = h3jax.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)


def _equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def params():
  return params_lib.init_params(CFG, jax.random.key(0))


def _save_ckpt(directory, params, step=3):
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(step, params=params, config=CFG)


def test_hf_folder_checkpoint_and_workdir_load_the_same_tree(tmp_path, params):
  h3jax.save_pretrained(params, CFG, tmp_path / "hf")
  _save_ckpt(tmp_path / "run" / "checkpoints", params)
  cfg_hf, p_hf = loader.load_model(tmp_path / "hf")
  cfg_ck, p_ck = loader.load_model(tmp_path / "run" / "checkpoints")
  cfg_wd, p_wd = loader.load_model(tmp_path / "run")  # a workdir: its checkpoints/
  assert cfg_ck == cfg_wd == CFG and cfg_hf.num_layers == CFG.num_layers
  assert _equal(p_hf, params) and _equal(p_ck, params) and _equal(p_wd, params)
  _, p16 = loader.load_model(tmp_path / "run", "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(p16)} == {np.dtype("bfloat16")}
  assert loader.hf_folder(tmp_path / "run") is None
  h3jax.save_pretrained(params, CFG, tmp_path / "run" / "hf")  # an exported workdir: hf/ wins
  assert loader.hf_folder(tmp_path / "run") == tmp_path / "run" / "hf"
  cfg, _ = loader.load_model(tmp_path / "run", "bfloat16")
  assert cfg.dtype == "bfloat16"  # an HF folder's cfg.dtype follows the load dtype


def test_missing_model_and_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="model folder not found"):
    loader.load_model(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="model folder not found"):
    loader.load_tokenizer(tmp_path / "absent")
  (tmp_path / "m").mkdir()
  assert loader.tokenizer_dir(tmp_path / "m") is None
  with pytest.raises(ValueError, match=r"model folder .*m has no tokenizer \(none of tokenizer.json"):
    loader.load_tokenizer(tmp_path / "m")
  (tmp_path / "m" / "hf").mkdir()
  (tmp_path / "m" / "hf" / "tokenizer.json").write_text("{}")
  assert loader.tokenizer_dir(tmp_path / "m") == tmp_path / "m" / "hf"
  with pytest.raises(ValueError, match="tokenizer files could not be loaded"):
    loader.load_tokenizer(tmp_path / "m")
