"""h3jax.compile_cache: executables are cached per machine kind, and a second process reuses them."""

import os
import pathlib
import subprocess
import sys

from h3jax import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_machine_tag_depends_on_the_cpu_features(monkeypatch):
  tag = compile_cache.machine_tag()
  assert tag.startswith("cpu-") and tag == compile_cache.machine_tag()
  real = pathlib.Path.read_text

  def other_cpu(self, *a, **k):  # the same folder read on a CPU without AVX-512
    if str(self) == "/proc/cpuinfo":
      return "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2\n"
    return real(self, *a, **k)

  monkeypatch.setattr(pathlib.Path, "read_text", other_cpu)
  assert compile_cache.machine_tag() != tag


_PROG = """
import sys, jax, jax.numpy as jnp
from h3jax import compile_cache
d = compile_cache.enable(sys.argv[1], min_compile_secs=0.0)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16)))
print(d)
"""


def test_second_process_reuses_the_first_ones_executable(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

  def run():
    return subprocess.run([sys.executable, "-c", _PROG, str(tmp_path)], capture_output=True, text=True, env=env,
                          check=True, timeout=300).stdout.strip()

  d = pathlib.Path(run())
  assert d.parent == tmp_path and d.name == compile_cache.machine_tag()
  first = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
  assert first, "nothing was cached"
  assert run() == str(d)
  assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == first  # a hit: nothing compiled or rewritten


def test_entries_appear_whole_via_a_renamed_temporary_file(tmp_path, monkeypatch):
  """Another process sharing the folder must find no entry or a whole one (jax's own unlimited cache
  writes in place, and a half-written executable aborts the reader)."""
  from jax._src import lru_cache
  compile_cache._install_atomic_put()
  cache = lru_cache.LRUCache(str(tmp_path), max_size=-1)
  final = tmp_path / f"k1{lru_cache._CACHE_SUFFIX}"
  seen = []
  real_replace = os.replace

  def replace(src, dst):
    seen.append((pathlib.Path(dst) == final, final.exists(), pathlib.Path(src).read_bytes()))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  value = bytes(range(256)) * 1000
  cache.put("k1", value)
  assert seen == [(True, False, value)]  # the whole value, renamed onto a name no reader had seen
  assert cache.get("k1") == value and sorted(p.name for p in tmp_path.iterdir()) == [final.name]
  cache.put("k1", b"other")  # an existing entry is kept, as jax's put does
  assert cache.get("k1") == value and len(seen) == 1


def test_size_limited_cache_keeps_jax_locked_put(tmp_path, monkeypatch):
  from jax._src import lru_cache
  compile_cache._install_atomic_put()
  cache = lru_cache.LRUCache(str(tmp_path), max_size=1 << 20)
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(AssertionError("renamed")))
  cache.put("k2", b"abc")
  assert cache.get("k2") == b"abc" and (tmp_path / f"k2{lru_cache._ATIME_SUFFIX}").is_file()
