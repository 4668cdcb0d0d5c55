"""Test set-up: 8 fake CPU devices (must precede the first JAX operation)."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
