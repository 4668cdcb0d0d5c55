"""Streaming safetensors reader/writer against the safetensors library."""

import glob
import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from h3jax.hf import st_io


def _tensors():
  g = torch.Generator().manual_seed(0)
  return {"a.weight": torch.randn(5, 7, generator=g), "b": torch.randn(11, generator=g).bfloat16(),
          "c": torch.arange(12).reshape(3, 4), "d": torch.randn(2, 3, generator=g).half(),
          "e": torch.zeros(0, 4)}


def test_reader_matches_safetensors(tmp_path):
  t = _tensors()
  save_file(t, tmp_path / "model.safetensors")
  with st_io.SafetensorsReader(tmp_path) as r:
    assert sorted(r.keys()) == sorted(t)
    assert r.dtype("b") == np.dtype(ml_dtypes.bfloat16)
    for k, v in t.items():
      got = r.get(k)
      assert got.shape == tuple(v.shape) and r.shape(k) == tuple(v.shape)
      np.testing.assert_array_equal(got.astype(np.float64), v.double().numpy())


def test_writer_shards_and_index_read_by_safetensors(tmp_path):
  t = _tensors()
  w = st_io.SafetensorsWriter(tmp_path, max_shard_size=100)
  for k, v in t.items():
    w.add(k, v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
  names = w.close()
  assert len(names) > 1 and not glob.glob(str(tmp_path / "*.data"))
  index = json.loads((tmp_path / st_io.INDEX_NAME).read_text())
  assert set(index["weight_map"]) == set(t) and set(index["weight_map"].values()) == set(names)
  back = {}
  for n in names:
    back.update(load_file(tmp_path / n))
  for k, v in t.items():
    assert torch.equal(back[k], v), k
  with st_io.SafetensorsReader(tmp_path) as r:  # via the index
    np.testing.assert_array_equal(r.get("c"), t["c"].numpy())


def test_single_shard_named_model_safetensors(tmp_path):
  w = st_io.SafetensorsWriter(tmp_path, max_shard_size="1GB")
  w.add("x", np.ones((2, 2), np.float32))
  assert w.close() == ["model.safetensors"] and not (tmp_path / st_io.INDEX_NAME).exists()


def test_truncated_file_is_a_clear_error(tmp_path):
  save_file(_tensors(), tmp_path / "model.safetensors")
  f = tmp_path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-10])
  with pytest.raises(st_io.SafetensorsError, match="truncated"):
    st_io.SafetensorsReader(tmp_path)


def test_corrupt_header_is_a_clear_error(tmp_path):
  f = tmp_path / "model.safetensors"
  f.write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
  with pytest.raises(st_io.SafetensorsError, match="corrupt safetensors header"):
    st_io.SafetensorsReader(f)
  f.write_bytes(b"\x01\x02")
  with pytest.raises(st_io.SafetensorsError, match="truncated or not a safetensors file"):
    st_io.SafetensorsReader(f)


def test_index_naming_missing_shard(tmp_path):
  (tmp_path / st_io.INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="missing"):
    st_io.SafetensorsReader(tmp_path)


@pytest.mark.parametrize("text,want", [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("1GiB", 2**30), (123, 123)])
def test_parse_size(text, want):
  assert st_io.parse_size(text) == want
  with pytest.raises(ValueError, match="cannot parse size"):
    st_io.parse_size("2 gigs")


@pytest.mark.parametrize("fail_after", [None, 0, 40])
def test_writer_data_copy_falls_back_to_user_space(tmp_path, monkeypatch, fail_after):
  """copy_file_range missing (None), refused at once (0) or after a partial copy (40 bytes):
  the file is still complete."""
  real = os.copy_file_range
  if fail_after is None:
    monkeypatch.delattr(os, "copy_file_range")
  else:
    def flaky(src, dst, count, *args):
      if os.lseek(src, 0, os.SEEK_CUR) >= fail_after:
        raise OSError(18, "Invalid cross-device link")
      return real(src, dst, min(count, fail_after), *args)
    monkeypatch.setattr(os, "copy_file_range", flaky)
  t = {"x": np.arange(64, dtype=np.float32).reshape(8, 8), "y": np.ones(5, np.float32)}
  w = st_io.SafetensorsWriter(tmp_path)
  for k, v in t.items():
    w.add(k, v)
  w.close()
  got = load_file(tmp_path / "model.safetensors")
  for k, v in t.items():
    np.testing.assert_array_equal(got[k].numpy(), v)
