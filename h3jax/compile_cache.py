"""The persistent XLA compilation cache, shared by the CLIs (merge, evaluate, pipeline) and the study."""

from __future__ import annotations

import hashlib
import pathlib
import platform

import jax

from h3jax import io_atomic

DEFAULT_DIR = "~/.cache/h3jax/xla"


def machine_tag() -> str:
  """cpu-<hash of the CPU model and instruction-set flags>: a CPU executable is compiled for the host's
  features (AVX-512 or not), and a cache folder that outlives the machine (a run directory carried to an
  AMD machine, a home directory on a cluster) must not hand one CPU's code to another."""
  info = platform.machine() + platform.processor()
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    info += "".join(sorted({l for l in lines if l.startswith(("model name", "flags", "vendor_id"))}))
  except OSError:
    pass
  return "cpu-" + hashlib.sha256(info.encode()).hexdigest()[:12]


def enable(path=DEFAULT_DIR, min_compile_secs: float = 0.2) -> pathlib.Path:
  """Persist compiled executables under `path`/<machine tag> so a re-run (or another process) skips
  compiling the same shapes: per-tensor merge kernels, decode chunks per batch and cache bucket, train
  steps. Returns the folder used."""
  path = pathlib.Path(path).expanduser() / machine_tag()
  path.mkdir(parents=True, exist_ok=True)
  _install_atomic_put()
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return path


def _atomic_put(self, key: str, value: bytes) -> None:
  """jax's unlimited file cache (`max_size=-1`, no lock) writes an entry in place, so another process
  sharing the folder (the study's parallel stages, test workers) can read it half-written and abort
  in the executable's deserialisation. Written to a temporary file and renamed instead: a reader finds
  no entry or a whole one."""
  from jax._src import lru_cache
  if not key:
    raise ValueError("key cannot be empty")
  final = pathlib.Path(str(self.path).removeprefix("file://")) / f"{key}{lru_cache._CACHE_SUFFIX}"
  if not final.exists():  # an existing entry is kept, as jax's put does
    io_atomic.write_bytes(final, value)


def _install_atomic_put() -> None:
  """Routes jax's unlimited local file cache through `_atomic_put`; a size-limited cache (`max_size`
  set, which jax guards with a file lock) and remote paths keep jax's own `put`."""
  from jax._src import lru_cache
  cls = lru_cache.LRUCache
  if getattr(cls.put, "_h3jax_atomic", False):
    return
  own = cls.put

  def put(self, key, value):
    if self.eviction_enabled or not lru_cache._is_local_filesystem(str(self.path)):
      return own(self, key, value)
    return _atomic_put(self, key, value)

  put._h3jax_atomic = True
  cls.put = put
