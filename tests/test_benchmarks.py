"""Benchmark scripts stay runnable where nothing else runs them: moe_train_speed.py's h3jax step once at toy size
(it stopped running unnoticed once, after a change to the trainable-rule dialect). Its numbers are not checked
here: performance claims live in the scripts' own output (README → Numbers)."""

import argparse
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import moe_train_speed  # noqa: E402


def test_moe_train_speed_h3jax_step_runs_at_toy_size():
  a = argparse.Namespace(layers=1, batch=1, seq=16, top_k=2, dispatch="capacity", steps=1, warmup=0, remat="none")
  res = moe_train_speed.bench_h3jax(a)
  assert res["impl"] == "h3jax (capacity, remat none)" and res["tokens_per_s"] > 0
