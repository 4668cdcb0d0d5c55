"""The persistent XLA compilation cache, shared by the CLIs (merge, evaluate, pipeline)."""

from __future__ import annotations

import pathlib

import jax

DEFAULT_DIR = "~/.cache/h3jax/xla"


def enable(path=DEFAULT_DIR, min_compile_secs: float = 0.2) -> pathlib.Path:
  """Persist compiled executables under `path` so a re-run (or another process) skips compiling
  the same shapes: per-tensor merge kernels, decode chunks per batch and cache bucket, train steps."""
  path = pathlib.Path(path).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return path
