"""Training loop: kill-and-resume equals uninterrupted (real SIGKILL, unpacked and packed), NaN guard.

The data path itself (h3jax.data through stages.make_data) is tested in test_train_data.py."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from h3jax.checkpoint import load_params
from h3jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
AXES = ("helpful", "harmless", "honest")


def write_jsonl(path, n=24):
  rows = [{"instruction": f"question {i} about {AXES[i % 3]}?", "response": f"answer {i}: " + "abc" * (i % 4 + 1),
           "task": i % 3} for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def overrides(data, steps, every, extra=()):
  return [f"--config.data.sources=('{data}',)", f"--config.train.steps={steps}",
          f"--config.train.checkpoint_every={every}", "--config.data.seq_len=32", "--config.train.batch_size=4",
          "--config.train.eval_every=0", "--config.train.progress=False", "--config.lora.dropout=0.1",
          *extra]


def train_cmd(workdir, args):
  return [sys.executable, "-m", "h3jax.train", "--config=configs/tiny.py:helpful", f"--workdir={workdir}", *args]


def _env(cache_dir=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")  # XLA_FLAGS (-O0, conftest) inherited
  if cache_dir is not None:  # later runs of the same config load the first run's executables
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


@pytest.mark.slow  # three CLI runs in subprocesses
# packed: optin (+3 min on the busy box); test_train_data.py resumes a packed run in-process by default
@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=pytest.mark.optin)])
def test_kill_and_resume_equals_uninterrupted(tmp_path, pack):
  data = write_jsonl(tmp_path / "d.jsonl")
  # packed: 128-token rows hold ~2 examples (the ~50-token examples are cut at 32 unpacked)
  args = overrides(data, 40, 4, ["--config.data.pack=True", "--config.data.seq_len=128"] if pack else [])
  env = _env(tmp_path / "xla_cache")
  full = subprocess.run(train_cmd(tmp_path / "full", args), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert full.returncode == 0, full.stderr[-3000:]

  ck = tmp_path / "killed" / "checkpoints"
  proc = subprocess.Popen(train_cmd(tmp_path / "killed", args), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (ck / "8").is_dir():  # a checkpoint exists: kill mid-run
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  steps_at_kill = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
  assert 40 not in steps_at_kill and steps_at_kill, steps_at_kill

  resumed = subprocess.run(train_cmd(tmp_path / "killed", args), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _, p_full = load_params(tmp_path / "full" / "checkpoints")
  _, p_res = load_params(tmp_path / "killed" / "checkpoints")
  for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the metric log of the resumed run has each step exactly once and matches the uninterrupted one
  rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  full_rows, res_rows = rows(tmp_path / "full"), rows(tmp_path / "killed")
  assert [r["step"] for r in res_rows] == list(range(1, 41))
  assert [r["train/loss"] for r in res_rows] == [r["train/loss"] for r in full_rows]


def test_metrics_log_with_a_torn_line_resumes(tmp_path, capsys):
  """A run killed while writing metrics.jsonl leaves a torn last line; resuming drops it (and the rows
  after the resumed checkpoint) instead of failing on it, and appends whole lines after it."""
  from h3jax.train import loop
  f = tmp_path / loop.METRICS_FILE
  rows = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (1, 2, 3)]
  f.write_text("\n".join(rows) + "\n" + '{"step": 4, "train/lo')
  w = loop._Writer(tmp_path, resume_step=2)
  w.write(3, {"loss": 0.25})
  w.close()
  assert [json.loads(l) for l in f.read_text().splitlines()] == [
      {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}, {"step": 3, "train/loss": 0.25}]
  assert "metrics.jsonl: dropped torn line(s) [4]" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir() if p.name != "tb") == [loop.METRICS_FILE]  # no temp file


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  from h3jax.train.defaults import load_config_file
  c = load_config_file(REPO / "configs" / "tiny.py", "helpful")
  data = write_jsonl(tmp_path / "d.jsonl")
  c.data.sources = (str(data),)
  c.data.seq_len = 32
  c.train.batch_size = 4
  c.train.steps = 6
  c.train.checkpoint_every = 1
  c.train.progress = False
  c.train.eval_every = 0
  c.train.clip_norm = 0.0
  c.train.decay = "constant"
  c.train.lr = 1e30  # the first update blows the LoRA factors up: loss is inf/NaN at step 2
  with pytest.raises(FloatingPointError) as e:
    loop.train_and_evaluate(c, tmp_path / "run")
  msg = str(e.value)
  assert "non-finite training loss" in msg and "Last good checkpoint: step 1" in msg
  cfg, params = load_params(tmp_path / "run" / "checkpoints")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [1]


def test_inf_update_with_finite_loss_is_never_saved_or_exported(tmp_path):
  # Issue 11 item 3: lr=1e39 is inf in float32; step 1's loss (computed before the update) is finite
  # but the updated params are not. Old code printed "done" and saved/exported non-finite tensors.
  from h3jax.train.defaults import load_config_file
  c = load_config_file(REPO / "configs" / "tiny.py", "helpful")
  c.data.sources = (str(write_jsonl(tmp_path / "d.jsonl")),)
  c.data.seq_len = 32
  c.train.batch_size = 4
  c.train.steps = 2
  c.train.checkpoint_every = 1
  c.train.progress = False
  c.train.eval_every = 0
  c.train.lr = 1e39
  c.export.enabled = True
  with pytest.raises(FloatingPointError) as e:
    loop.train_and_evaluate(c, tmp_path / "run")
  msg = str(e.value)
  assert "at step 1" in msg and "No checkpoint was saved" in msg, msg
  assert "non-finite parameters after the update" in msg or "non-finite gradient norm" in msg, msg
  ckpts = tmp_path / "run" / "checkpoints"
  assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]
  assert not (tmp_path / "run" / "hf").exists()
  rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert rows == []  # the bad step's metrics are not logged as a good step


def test_non_finite_flags():
  assert loop.non_finite({"loss": 1.0, "grad_norm": 2.0, "params_finite": 1.0}) == ""
  assert "gradient norm" in loop.non_finite({"loss": 1.0, "grad_norm": float("inf"), "params_finite": 1.0})
  assert "parameters" in loop.non_finite({"loss": 1.0, "grad_norm": 2.0, "params_finite": 0.0})
  assert "loss" in loop.non_finite({"loss": float("nan"), "grad_norm": 2.0, "params_finite": 1.0})
