"""The native kernels' shared library: built on first use with the machine's C++ compiler, cached per CPU.

Every `*.cc` listed in SOURCES is compiled with `$CXX` (else `c++`) and `-march=native` (`$H3JAX_KERNEL_MARCH`
instead, e.g. `haswell`: the AVX2 code paths, tested on an AVX-512 machine by `make test-portable`) into one
library under `$H3JAX_KERNEL_CACHE` (default `~/.cache/h3jax/kernels`), keyed by the sources, compiler, flags,
jaxlib and CPU flags, so a cached build never runs on a CPU it was not built for. `library()` loads it once per
process; without a compiler, after a failed build, or with `H3JAX_CPU_KERNELS=0` it is None (one warning),
and every caller keeps its numpy / XLA path. Users: `cpu_matmul` and `decode_attention` (decode matmuls and
attention, XLA FFI targets) and `tau_select` (the streaming TIES cuts, plain C calls through ctypes).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

_HERE = Path(__file__).parent
SOURCES = (_HERE / "panel_matmul.cc", _HERE / "decode_attention.cc", _HERE / "tau_select.cc")
ENABLE_ENV = "H3JAX_CPU_KERNELS"
CACHE_ENV = "H3JAX_KERNEL_CACHE"
DEFAULT_CACHE = "~/.cache/h3jax/kernels"
MARCH_ENV = "H3JAX_KERNEL_MARCH"  # the build's -march (default native; e.g. haswell: an AVX2 build to test here)
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")

log = logging.getLogger(__name__)


def enabled() -> bool:
  return os.environ.get(ENABLE_ENV, "1") not in ("0", "false", "no", "off")


def _cpu_identity() -> str:
  """The CPU's model and instruction-set flags (what -march=native compiles for)."""
  with contextlib.suppress(OSError):
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))
  return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str:
  return os.environ.get("CXX") or "c++"


def _cxxflags() -> tuple:
  march = os.environ.get(MARCH_ENV) or "native"
  return tuple(f"-march={march}" if f == "-march=native" else f for f in CXXFLAGS)


def _build_key(cxx_version: str) -> str:
  import jaxlib
  h = hashlib.sha256()
  for part in (*(src.read_bytes() for src in SOURCES), cxx_version.encode(), " ".join(_cxxflags()).encode(),
               jaxlib.__version__.encode(), _cpu_identity().encode()):
    h.update(part)
    h.update(b"\0")
  return h.hexdigest()[:16]


def _cache_root() -> Path:
  return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


@contextlib.contextmanager
def _locked(lock_path: Path):
  """Serializes concurrent builds (test workers, parallel study stages) where fcntl exists."""
  try:
    import fcntl
  except ImportError:  # pragma: no cover - not POSIX: racing builds still end in an atomic rename
    yield
    return
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def build(cache_root: Path | None = None) -> Path:
  """The compiled kernel library (built if not cached). Raises RuntimeError with the compiler's output."""
  cxx = _compiler()
  if shutil.which(cxx) is None:
    raise RuntimeError(f"no C++ compiler {cxx!r} on PATH (set CXX)")
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
  root = Path(cache_root) if cache_root is not None else _cache_root()
  out_dir = root / _build_key(version)
  lib = out_dir / "libh3jax_cpu_kernels.so"
  if lib.exists():
    return lib
  out_dir.mkdir(parents=True, exist_ok=True)
  with _locked(out_dir / ".lock"):
    if lib.exists():  # another process built it while we waited
      return lib
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
      cmd = [cxx, *_cxxflags(), f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
      log.info("building the h3jax CPU kernels into %s (once per machine)", out_dir)
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
      os.replace(tmp, lib)  # whole or absent: a reader never loads a half-written library
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
  return lib


_state: dict = {}  # "lib": the loaded library or None (decided once per process)
_state_lock = threading.Lock()  # threads of one process (the merge driver's, a server's) load it once


def library():
  """The loaded library (ctypes.CDLL), or None where it cannot be built or is disabled (warned once)."""
  if not enabled():
    return None
  with _state_lock:
    if "lib" not in _state:
      try:
        _state["lib"] = ctypes.cdll.LoadLibrary(str(build()))
      except Exception as e:  # no compiler, a failed build: every caller has a numpy / XLA path
        log.warning("h3jax CPU kernels unavailable (numpy / XLA paths are used instead): %s", e)
        _state["lib"] = None
    return _state["lib"]


_targets: dict = {}  # FFI target name -> whether it is registered in this process (decided once)


def ffi_target(target: str, symbol: str) -> bool:
  """Registers the library's handler `symbol` as the CPU FFI target `target`, once per process. False when
  the library is disabled or missing, or the registration fails (one warning): the caller uses its XLA path."""
  if not enabled():
    return False
  with _state_lock:
    if target in _targets:
      return _targets[target]
  lib = library()
  with _state_lock:
    if target not in _targets:
      try:
        if lib is not None:
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        _targets[target] = lib is not None
      except Exception as e:  # an FFI mismatch: XLA's ops still work
        log.warning("h3jax CPU kernel %s unavailable, XLA's ops run instead: %s", target, e)
        _targets[target] = False
    return _targets[target]
