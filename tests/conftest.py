"""Test set-up: 8 fake CPU devices (must precede the first JAX operation)."""

import os
import pathlib

import pytest

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU aborts the process (LOG(FATAL), taking the xdist worker with it) when one of the 8 fake devices'
# threads reaches a collective 40 s after the others; on 2 loaded cores that happens. Wait far longer.
COLLECTIVE_TIMEOUTS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
                       "--xla_cpu_collective_timeout_seconds=1800")
if "collective_call_terminate" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {COLLECTIVE_TIMEOUTS}".strip()

# Faster compiling for every test process and the command lines they start (they inherit XLA_FLAGS): most
# of the suite's time is XLA compiling many small programs that then run for milliseconds, and LLVM at -O0
# halves that (test_llama + test_moe: 191 -> 113 s, 145 -> 70 s of it compiling; the whole default suite
# 1295 -> 956 s; docs/testing.md). Dots still run in XLA's library kernels. Also tried: XLA:CPU's older
# fusion emitter (--xla_cpu_use_fusion_emitters=false) cut compiling by half again, but a suite run with it
# segfaulted inside XLA's compiler once (never seen without it), so it is not used. A flag already in
# XLA_FLAGS is left as set.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"
for _flag in FAST_COMPILE_XLA_FLAGS.split():
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_flag}"


def optimized_env(**extra) -> dict:
  """os.environ without FAST_COMPILE_XLA_FLAGS, for a subprocess whose compute-bound loops dominate its
  compiling (judge training: 21 s at XLA's defaults against 57 s at -O0)."""
  flags = [f for f in os.environ["XLA_FLAGS"].split() if f not in FAST_COMPILE_XLA_FLAGS.split()]
  return dict(os.environ, XLA_FLAGS=" ".join(flags), **extra)


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("H3JAX_DATA_ROOT", REPO.parent / "shared" / "data"))
SMOLLM2_DIR = pathlib.Path(os.environ.get("H3JAX_SMOLLM2_DIR", REPO / "artifacts" / "smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def data_root():
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared data not found at {SHARED_DATA}")
  return SHARED_DATA


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under H3JAX_STRICT_SKIPS=1 (set by `make test`) a skip is a failure: the CI run has every
  prerequisite (SmolLM2 folder, shared data, oracle venvs), so a skip there would hide a broken set-up."""
  outcome = yield
  rep = outcome.get_result()
  if os.environ.get("H3JAX_STRICT_SKIPS") == "1" and rep.skipped and not hasattr(rep, "wasxfail"):
    rep.outcome = "failed"
    rep.longrepr = f"skipped under H3JAX_STRICT_SKIPS=1 (a prerequisite is missing): {rep.longrepr}"


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run first: under `-n 2` the longest (the tiny study, ~4 min) then overlaps the
  rest of the suite on the other worker instead of starting late and running alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


def shared_tmp(tmp_path_factory) -> pathlib.Path:
  """The run's temporary folder common to every xdist worker (pytest-of-<user>/pytest-<N>/), for outputs
  made once per pytest run under a file lock."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


# Quick local judges: 40% of the judge data, one head setting (the full build is test_judges' opt-in test).
QUICK_JUDGES = dict(fraction=0.4, l2=3e-5)
_BUILD_JUDGES = """import pathlib, sys
from h3jax.evaluation.judges import heads, train
out, root, fraction, l2, only = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5:]
train.build_judges(pathlib.Path(out), root, only=only or None, fraction=fraction, cache_dir=None,
                   grid=(heads.HeadConfig(l2=l2),), log=lambda *a: None)
"""


def build_quick_judges(out, data_root, only=()) -> None:
  """QUICK_JUDGES into `out`, in a process at XLA's default optimisation (optimized_env: the judges' training
  loops take 21 s there against 57 s at -O0). Judges built at another optimisation level differ in the last
  bits, so a test comparing with these rebuilds through here too."""
  import subprocess
  import sys
  cmd = [sys.executable, "-c", _BUILD_JUDGES, str(out), str(data_root), str(QUICK_JUDGES["fraction"]),
         str(QUICK_JUDGES["l2"]), *only]
  subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=900,
                 env=optimized_env(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1"))


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """The folder `name` in the run's common temporary folder, made by `make(folder)` once per pytest run:
  the first worker to need it makes it under a file lock (in place: what it writes may hold its own
  path) and then writes `name.done`; the others wait on the lock and reuse it. A folder left without its
  marker (a worker killed half-way) is made again."""
  import filelock
  import shutil
  shared = shared_tmp(tmp_path_factory)
  out, done = shared / name, shared / f"{name}.done"
  with filelock.FileLock(str(shared / f"{name}.lock")):
    if not done.is_file():
      shutil.rmtree(out, ignore_errors=True)
      make(out)
      done.write_text("")
  return out


@pytest.fixture(scope="session")
def quick_judges(tmp_path_factory, data_root):
  """(folder, {task: metrics}) of QUICK_JUDGES, built once per pytest run by the first worker that needs
  them (test_judges checks them; the tiny study scores with them); other workers wait on the lock."""
  import json
  out = made_once(tmp_path_factory, "quick_judges", lambda d: build_quick_judges(d, data_root))
  return out, json.loads((out / "judges.json").read_text())
