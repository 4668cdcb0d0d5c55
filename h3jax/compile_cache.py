"""The persistent XLA compilation cache, shared by the CLIs (merge, evaluate, pipeline) and the study."""

from __future__ import annotations

import hashlib
import pathlib
import platform

import jax

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
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return path
