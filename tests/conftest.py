"""Test set-up: 8 fake CPU devices (must precede the first JAX operation)."""

import os

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

# For the command-line runs of tiny random models (the tiny study, the mesh CLI runs): their many small
# programs compile faster with LLVM at -O0 and run for milliseconds either way (the tiny study: 243 against
# 282 CPU-s; docs/testing.md). Not for the real SmolLM2, whose programs run slower unoptimised.
TINY_MODEL_XLA_FLAGS = "--xla_backend_optimization_level=0"

import pathlib

import pytest

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
