"""Two localhost processes (jax.distributed, gloo CPU collectives) run sharded train steps on a global
mesh: data x tensor (2 devices each), and the 4-expert MoE with expert parallelism on data x expert
(4 devices each; the all_to_all crosses processes). Both equal the single-process run."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import test_train_step as tts

HERE = pathlib.Path(__file__).resolve().parent


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_workers(tmp_path, mode):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{HERE}{os.pathsep}{HERE.parent}")
  env.pop("JAX_NUM_CPU_DEVICES", None)  # each worker sets its devices itself
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(HERE / "train_mp_worker.py"), str(port), str(i), str(tmp_path),
                             mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=500)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, o) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"worker {i} failed:\n{o[-4000:]}"
  return dict(np.load(tmp_path / "params.npz"))


def _check_equal(got, problem):
  cfg, params, labels, lc, batches = problem
  state, ms = tts.run_steps(cfg, params, labels, lc, batches)
  np.testing.assert_allclose(got.pop("__losses__"), [float(m["loss"]) for m in ms], rtol=1e-5)
  flat = {"/".join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  assert set(got) == set(flat)
  init = {"/".join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for k in flat:
    # Adam turns summation-order noise in near-zero gradients into ~lr-sized element differences (the
    # two-process all-reduce sums in another order): compare each leaf's error with how far it moved.
    err, moved = np.linalg.norm(got[k] - flat[k]), np.linalg.norm(flat[k] - init[k])
    assert err <= 1e-3 * moved + 1e-6 * np.linalg.norm(flat[k]), (k, err, moved)


@pytest.mark.slow
@pytest.mark.optin  # 2 extra JAX processes + compiles: ~1.5 min idle, 8 min on the busy 2-core box
def test_two_process_sharded_steps_equal_single_process(tmp_path):
  _check_equal(_two_workers(tmp_path, "dense_tp"), tts.mp_problem())


@pytest.mark.slow
@pytest.mark.optin  # as above, with 8 devices over 2 processes
def test_two_process_expert_parallel_moe_equals_single_process(tmp_path):
  _check_equal(_two_workers(tmp_path, "moe_ep"), tts.mp_problem(num_experts=4))
