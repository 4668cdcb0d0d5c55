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
