"""model_speed.py's decode rows against the weight-streaming limit, in interleaved rounds (imported as
`decode_limit` when a script runs).

Each round reads the memory bandwidth (`timing.bandwidth_probe`), times h3jax's decode at n and 1 new
tokens (their difference excludes the prefill), and times the step's kernel calls alone (`kernel_calls`), so
the gap to the limit splits into the kernels' share and the rest of the step's. This machine's bandwidth
moved by 10-30% within minutes: a limit read once, minutes before the decode ran, mixed two machine states
(72-89% of it across runs of the same code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from h3jax.kernels import cpu_matmul
from timing import bandwidth_probe, interleaved_rounds


def chained_calls(groups, B: int):
  """A call that runs the CPU kernel over each group of packed weights (at most 8 sharing an input width) at B
  rows, one after another: each call's input depends on the previous output, as in a decode step."""
  width = max(g[0].shape[1] for g in groups)

  @jax.jit
  def chain(x0_NW, groups):
    x_NW = x0_NW
    # Each call's input depends on the previous output, as in the step, but keeps x0's values: a chain
    # scaled down each call went subnormal within ~15 calls through the real weights (slow multiply-adds on
    # some CPUs), and an unscaled one overflowed to inf.
    for g in groups:
      y = cpu_matmul.panel_matmuls(x_NW[:, :g[0].shape[1]], g)[0]
      x_NW = x0_NW + 0.0 * jnp.tile(y, (1, -(-width // y.shape[1])))[:, :width]
    return x_NW
  x = jnp.ones((B, width), jnp.float32)
  return lambda: chain(x, groups).block_until_ready()


def kernel_calls(p, B: int):
  """A run of the decode step's weight products alone: the CPU kernel calls of a step at B rows over the
  packed params `p` (q / k / v, o, gate / up, down per layer, then the head), chained as a step chains them,
  with none of the step's other work (norms, RoPE, attention, the cache, sampling). None without the kernel."""
  if "kernel_panels" not in p.get("lm_head", {}):
    return None
  groups = [[layer[a][k]["kernel_panels"] for k in ks] for layer in p["layers"]
            for a, ks in (("attn", ("q_proj", "k_proj", "v_proj")), ("attn", ("o_proj",)),
                          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))]
  return chained_calls(groups + [[p["lm_head"]["kernel_panels"]]], B)


def decode_limit_rounds(res: dict, ours, kernels, n: int, B: int, weight_bytes: float, rounds: int):
  """h3jax's decode at batch B (`ours(k)`: k new tokens) in `rounds` rounds of the module docstring, into
  `res`: the row's tokens/s (best n-token run less best 1-token run), the per-round tokens/s, limits and
  fractions, and the best round's limit (conservative: the fastest bandwidth seen)."""
  nbytes = 1 << 30
  # A round: the bandwidth (best of 3 sums of ~40 ms), n and 1 new tokens (one call each: ~1 s and ~0.1 s),
  # the kernel calls alone (best of 5 calls of ~25 ms): a single call this short varied by 30% here.
  runs = {"bandwidth": (bandwidth_probe(nbytes), 3), "n": (lambda: ours(n), 1), "1": (lambda: ours(1), 1)}
  if kernels is not None:
    runs["kernels"] = (kernels, 5)
  for fn, _ in runs.values():
    fn()  # compile / warm up
  times = interleaved_rounds({k: fn for k, (fn, _) in runs.items()}, rounds,
                             calls={k: c for k, (_, c) in runs.items()})
  limits = [nbytes / t / weight_bytes for t in times["bandwidth"]]  # tok/s per step at that round's bandwidth
  step_s = [(a - b) / (n - 1) for a, b in zip(times["n"], times["1"])]
  rec = dict(tok_s=[B / t for t in step_s], streaming_limit_tok_s=limits,
             frac_of_streaming=[1 / (t * lim) for t, lim in zip(step_s, limits)])
  if kernels is not None:  # the kernels' own fraction of the limit, and the step's time outside them
    rec["kernels_frac_of_streaming"] = [1 / (t * lim) for t, lim in zip(times["kernels"], limits)]
    rec["step_ms_outside_kernels"] = [1e3 * (a - b) for a, b in zip(step_s, times["kernels"])]
  res[f"decode_tok_s_h3jax_b{B}"] = B * (n - 1) / (min(times["n"]) - min(times["1"]))
  res[f"decode_rounds_b{B}"] = rec
  res[f"decode_streaming_limit_tok_s_best_round_b{B}"] = max(limits)
