"""Streaming safetensors I/O: read one tensor at a time, write without buffering shards.

The format is an 8-byte little-endian header length, a JSON header mapping
names to {dtype, shape, data_offsets}, then raw little-endian bytes. We parse it
ourselves (rather than via `safetensors.numpy`) so that bf16 comes back as
`ml_dtypes.bfloat16`, tensors are read one at a time with pread, every offset is validated against the file size before
any data is touched (a truncated download is a clear error, not garbage), and the
writer can stream tensors to disk with O(1) host memory.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
import tempfile
from typing import Dict, Iterator, Optional

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
  """A safetensors file or index that cannot be read as such."""


def parse_size(size) -> int:
  """'2GB' | '500MB' | '10KiB' | int -> bytes (HF convention: GB = 10**9, GiB = 2**30)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"cannot parse size {size!r}; use e.g. '2GB', '500MB' or a byte count")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  exp = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
  return int(float(m.group(1)) * base**exp)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path, name: str, e) -> None:
  """A header entry is {dtype: str, shape: [ints >= 0], data_offsets: [begin, end] ints}."""
  if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
    raise SafetensorsError(f"{path}: corrupt safetensors header: tensor {name!r} entry {str(e)[:100]} lacks "
                           f"dtype / shape / data_offsets")
  shape, offsets = e["shape"], e["data_offsets"]
  if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
    raise SafetensorsError(f"{path}: corrupt safetensors header: tensor {name!r} has shape {shape!r} "
                           f"(dimensions must be integers >= 0)")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
          and 0 <= offsets[0] <= offsets[1]):
    raise SafetensorsError(f"{path}: corrupt safetensors header: tensor {name!r} has data_offsets "
                           f"{offsets!r}")


class _File:
  """One .safetensors file: validated header, tensors read on demand."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    size = path.stat().st_size
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise SafetensorsError(f"{path}: truncated or not a safetensors file (size {size} bytes)")
      (n,) = struct.unpack("<Q", raw)
      if n > min(_MAX_HEADER, size - 8):
        raise SafetensorsError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                             f"expected an object of tensors)")
    self.metadata = header.pop("__metadata__", None) or {}
    self.data_start = 8 + n
    self.entries = header
    for name, e in header.items():
      _check_entry(path, name, e)
      if e.get("dtype") not in _ST_TO_NP:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
      begin, end = e["data_offsets"]
      want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(_ST_TO_NP[e["dtype"]]).itemsize
      if end - begin != want or begin < 0:
        raise SafetensorsError(f"{path}: tensor {name!r} has inconsistent offsets {e['data_offsets']} "
                               f"for shape {e['shape']} {e['dtype']}")
      if self.data_start + end > size:
        raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {self.data_start + end} "
                               f"but the file has {size} bytes (incomplete download?)")
    self._fd = None

  def get(self, name: str) -> np.ndarray:
    """Reads the tensor into a fresh array (pread, not mmap: touched mmap pages would
    stay resident until unmapped and defeat tensor-at-a-time loading)."""
    e = self.entries[name]
    begin, end = e["data_offsets"]
    dt = np.dtype(_ST_TO_NP[e["dtype"]]).newbyteorder("<")
    out = np.empty(e["shape"], dt)
    view = memoryview(out.reshape(-1).view(np.uint8))
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    got = 0
    while got < end - begin:
      n = os.preadv(self._fd, [view[got:]], self.data_start + begin + got)
      if n <= 0:
        raise SafetensorsError(f"{self.path}: unexpected end of file reading {name!r}")
      got += n
    return out.astype(out.dtype.newbyteorder("="), copy=False)

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class SafetensorsReader:
  """Tensors of a single file, a folder, or a sharded folder (via its index), one at a time."""

  def __init__(self, path):
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
      if (path / INDEX_NAME).exists():
        files = self._from_index(path / INDEX_NAME)
      elif (path / SINGLE_NAME).exists():
        files = [path / SINGLE_NAME]
      else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
          raise FileNotFoundError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors found")
    else:
      files = [path]
    self._files = [_File(f) for f in files]
    self._where: Dict[str, _File] = {}
    for f in self._files:
      for name in f.entries:
        if name in self._where:
          raise SafetensorsError(f"tensor {name!r} appears in both {self._where[name].path} and {f.path}")
        self._where[name] = f
    self.metadata = {k: v for f in self._files for k, v in f.metadata.items()}

  @staticmethod
  def _from_index(index_path):
    try:
      weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise SafetensorsError(f"{index_path}: not a valid safetensors index ({e})") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index_path.parent / n).exists()]
    if missing:
      raise FileNotFoundError(f"{index_path} lists shards that are missing: {missing}")
    return [index_path.parent / n for n in names]

  def keys(self):
    return list(self._where)

  def __contains__(self, name):
    return name in self._where

  def shape(self, name):
    return tuple(self._entry(name)["shape"])

  def dtype(self, name) -> np.dtype:
    return np.dtype(_ST_TO_NP[self._entry(name)["dtype"]])

  def nbytes(self, name) -> int:
    b, e = self._entry(name)["data_offsets"]
    return e - b

  def _entry(self, name):
    if name not in self._where:
      raise KeyError(f"tensor {name!r} not found in checkpoint")
    return self._where[name].entries[name]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a fresh numpy array (bf16 as ml_dtypes.bfloat16)."""
    self._entry(name)
    return self._where[name].get(name)

  def items(self) -> Iterator:
    for name in self._where:
      yield name, self.get(name)

  def close(self):
    for f in self._files:
      f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _copy_rest(src, out):
  """Appends all of `src` to `out` (flushed): in the kernel (copy_file_range, Linux) where it can,
  2-3x faster than copying through user-space buffers; the rest with copyfileobj."""
  n, off = os.fstat(src.fileno()).st_size, 0
  copy = getattr(os, "copy_file_range", None)
  try:
    while copy is not None and off < n:
      step = copy(src.fileno(), out.fileno(), n - off)
      if step <= 0:
        break
      off += step
  except OSError:
    pass  # a file-system pair the kernel cannot copy between
  if off < n:
    src.seek(off)
    out.seek(0, os.SEEK_END)
    shutil.copyfileobj(src, out, 16 * 2**20)


class SafetensorsWriter:
  """Appends tensors to shards of at most `max_shard_size` bytes, streaming to disk.

  Each shard's data goes to a scratch file as tensors arrive; on shard close the
  header is written and the data appended, so host memory stays O(one tensor).
  With more than one shard, files are named `model-0000i-of-0000n.safetensors`
  and `model.safetensors.index.json` is written, as transformers expects.
  """

  def __init__(self, out_dir, max_shard_size="5GB", metadata: Optional[dict] = None):
    self.out_dir = pathlib.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.max_bytes = parse_size(max_shard_size)
    self.metadata = {"format": "pt", **(metadata or {})}
    self._shards = []  # (tmp file name, {name: entry})
    self._data = None
    self._entries = {}
    self._offset = 0
    self._seen = set()
    self.total_bytes = 0

  def add(self, name: str, array):
    arr = np.asarray(array)
    if arr.dtype not in _NP_TO_ST:
      raise TypeError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
    if name in self._seen:
      raise ValueError(f"tensor {name!r} written twice")
    self._seen.add(name)
    if self._data is not None and self._offset + arr.nbytes > self.max_bytes and self._entries:
      self._close_shard()
    if self._data is None:
      self._data = tempfile.NamedTemporaryFile(dir=self.out_dir, suffix=".data", delete=False)
    data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    self._data.write(memoryview(data.reshape(-1).view(np.uint8)))
    self._entries[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                           "data_offsets": [self._offset, self._offset + arr.nbytes]}
    self._offset += arr.nbytes
    self.total_bytes += arr.nbytes

  def _close_shard(self):
    self._data.close()
    self._shards.append((self._data.name, self._entries))
    self._data, self._entries, self._offset = None, {}, 0

  def close(self) -> list:
    """Finish writing; returns the shard file names."""
    if self._data is not None or not self._shards:
      if self._data is None:
        self._data = tempfile.NamedTemporaryFile(dir=self.out_dir, suffix=".data", delete=False)
      self._close_shard()
    n = len(self._shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, (data_path, entries) in zip(names, self._shards):
      header = json.dumps({"__metadata__": self.metadata, **entries}, separators=(",", ":")).encode()
      header += b" " * (-len(header) % 8)  # keep tensor data 8-byte aligned
      with open(self.out_dir / fname, "wb") as out, open(data_path, "rb") as src:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        out.flush()
        _copy_rest(src, out)
      os.unlink(data_path)
      weight_map.update({k: fname for k in entries})
    if n > 1:
      index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
      (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names

  def abort(self):
    for data_path, _ in self._shards:
      if os.path.exists(data_path):
        os.unlink(data_path)
    if self._data is not None:
      self._data.close()
      os.unlink(self._data.name)
