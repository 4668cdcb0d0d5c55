"""Timing shared by the benchmark scripts (imported as `timing` when a script runs)."""

from __future__ import annotations

import pathlib
import platform
import time


def time_steps(step, n: int, warmup: int = 1) -> list:
  """Wall seconds of `n` calls of `step()` after `warmup` untimed calls."""
  for _ in range(warmup):
    step()
  out = []
  for _ in range(n):
    t = time.perf_counter()
    step()
    out.append(time.perf_counter() - t)
  return out


def interleaved_rounds(runs: dict, rounds: int, calls: dict | None = None) -> dict:
  """{name: [wall seconds per round]}: each round calls every (already warmed-up) run in order, `calls[name]`
  times (default once), and keeps its best. On a machine whose speed drifts over minutes, configurations timed
  one after another turn the drift into a ratio error (0.68x and 0.76x in two such LoRA runs); rounds expose
  every configuration to it alike."""
  calls = calls or {}
  times = {k: [] for k in runs}
  for _ in range(rounds):
    for k, run in runs.items():
      times[k].append(min(time_steps(run, calls.get(k, 1), warmup=0)))
  return times


def best_of(fn, repeats: int) -> float:
  """Best wall time of `repeats` calls (after one warm-up call)."""
  return min(time_steps(fn, repeats, warmup=1))


def bandwidth_probe(nbytes: int = 1 << 30):
  """A call that streams `nbytes` once: a jitted float32 sum over a buffer made here (the decode rows'
  limit is nbytes / its time). Made once, timed as often as wanted (model_speed reads it every round)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  return lambda: f(x).block_until_ready()


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
  """Bytes/s of `bandwidth_probe(nbytes)`, best of `repeats` calls."""
  return nbytes / best_of(bandwidth_probe(nbytes), repeats)


def best_wall_and_cpu(fn, repeats: int) -> tuple:
  """(best wall seconds, best CPU seconds of this process, all threads) of `repeats` calls after a
  warm-up. CPU time is far less disturbed by other jobs on a busy machine: a cross-check of wall time."""
  fn()
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return min(wall), min(cpu)


def train_flops(cfg, n_params: int, B: int, T: int) -> float:
  """6 N per token for the weights + causal attention scores and values (fwd+bwd)."""
  attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T * T * B  # 2 matmuls x 2 FLOP x 3 (fwd+bwd) / 2 causal
  return 6 * n_params * B * T + attn


def cpu_model() -> str:
  """The host CPU's model name (the Numbers tables name the machine each result is from)."""
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines()
           if l.startswith("model name")] if cpuinfo.exists() else []
  return names[0] if names else platform.processor()


def decode_tok_s(params, cfg, B: int, prompt_len: int, new_tokens: int, repeats: int) -> tuple:
  """Greedy decode (wall, CPU-time) tokens/s at batch B (a 1-token run is subtracted: prefill excluded); NaN
  where the decode steps took no measurable time beyond that run's noise (a toy model: `gpu_speed.py --tiny`)."""
  import numpy as np
  from h3jax import generation
  from h3jax.model import llama
  params = llama.unstack_layers(params, cfg)  # once, as `generate` does for all its batches
  prompt = np.random.RandomState(B).randint(3, cfg.vocab_size, (B, prompt_len))
  run = lambda n: generation.generate_tokens(params, cfg, prompt, np.ones_like(prompt), max_new_tokens=n)
  long, short = best_wall_and_cpu(lambda: run(new_tokens), repeats), best_wall_and_cpu(lambda: run(1), repeats)
  return tuple(B * (new_tokens - 1) / (a - b) if a > b else float("nan") for a, b in zip(long, short))
