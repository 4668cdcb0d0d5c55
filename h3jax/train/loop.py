"""train_and_evaluate(config, workdir): the training loop with exact resume.

Per step: batch = next(data) (an `h3jax.data.pipeline.BatchIterator`, whose
batches are a pure function of data, config and step), one jitted step over
the `config.mesh` device mesh (h3jax.train.sharding), metrics appended to workdir/metrics.jsonl (and
TensorBoard if tensorboardX is installed), a tqdm bar. Every
`train.checkpoint_every` steps params + optimizer state + the iterator's
`state()` (in the checkpoint's `extra["data"]`) go to workdir/checkpoints
(Orbax, `h3jax.checkpoint`). Running the same command again restores the
latest checkpoint and the iterator (`restore(state)`, which refuses other data
or settings) and continues: same batches, same dropout keys (folded from the
step), so the final params equal an uninterrupted run's. A non-finite loss stops the run with an error that
names the last good checkpoint; so do a non-finite gradient norm and non-finite updated params (a
finite loss is computed before the update); the bad state is never saved or exported.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp

from h3jax import progress as progress_lib
from h3jax.train import optim, sharding, stages, step as step_lib

METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
HLO_FILE = "train_step.hlo.txt"


class _Writer:
  """metrics.jsonl (+ TensorBoard scalars when tensorboardX is importable)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path = workdir / METRICS_FILE
    if self.path.exists():  # drop lines a killed run wrote after its last checkpoint, or tore
      keep, torn = [], []
      for n, line in enumerate(self.path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        try:
          row = json.loads(line) if line.strip() else None
        except ValueError:
          torn.append(n)
          continue
        if isinstance(row, dict) and row.get("step", 0) <= resume_step:
          keep.append(line)
      if torn:
        print(f"warning: {self.path}: dropped torn line(s) {torn} (a killed run was writing them)",
              file=sys.stderr, flush=True)
      tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
      tmp.write_text("".join(l + "\n" for l in keep))
      os.replace(tmp, self.path)  # the old file stays whole until the new one is
    # One write() per row (buffering=1 flushes each line), so a kill tears at most the last row.
    self.f = open(self.path, "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tb"))
    except ImportError:
      self.tb = None

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    self.f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

  def close(self):
    self.f.close()
    if self.tb is not None:
      self.tb.close()


def evaluate(eval_fn, params, batches, n_batches: int, put) -> dict:
  """Token-weighted mean eval loss (+ mean router stats) over the first n batches."""
  tot, n_tok, sums = 0.0, 0.0, {}
  for i in range(n_batches):
    m = jax.device_get(eval_fn(params, put(batches.batch(i))))
    tot += float(m["lm_loss"]) * float(m["n_tokens"])
    n_tok += float(m["n_tokens"])
    for k in ("gate_loss", "router_acc"):
      if k in m:
        sums[k] = sums.get(k, 0.0) + float(m[k]) / n_batches
  return {"lm_loss": tot / max(n_tok, 1.0), **sums}


def non_finite(m: dict) -> str:
  """Why a step's result must not be kept ('' if it may): the loss is computed before the update,
  so a finite loss can come with an inf gradient or inf/NaN updated params (e.g. an inf lr)."""
  params_finite = m.pop("params_finite", 1.0)  # a flag, not a metric to log
  if not math.isfinite(m["loss"]):
    return f"non-finite training loss ({m['loss']})"
  if not math.isfinite(m.get("grad_norm", 0.0)):
    return f"non-finite gradient norm ({m['grad_norm']})"
  if not params_finite:
    return "non-finite parameters after the update"
  return ""


def restore_data(it, extra, step: int, ckpt_dir) -> None:
  """Put the training iterator where checkpoint `step` left it (its extra["data"] state)."""
  data_state = (extra or {}).get("data")
  if data_state is None:
    raise ValueError(f"checkpoint step {step} in {ckpt_dir} has no data-iterator state (extra['data']); "
                     "cannot resume exactly")
  it.restore(data_state)
  if it.step != step:
    raise ValueError(f"checkpoint step {step} in {ckpt_dir} holds a data-iterator state at step {it.step}")


def train_and_evaluate(config, workdir, *, run: Optional[stages.Run] = None) -> dict:
  """Train per `config` in `workdir` (resuming if it holds checkpoints). Returns a summary dict."""
  t = config.train
  if run is None:  # mesh errors before loading (and fusing) any model
    n_exp = len(config.fusion.expert_dirs) if config.stage == "fusion" else 0
    sharding.check_mesh(sharding.resolve_axes(dict(config.mesh), jax.device_count()), num_experts=n_exp,
                        batch_size=t.batch_size, grad_accum=t.grad_accum_steps)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  run = run or stages.setup(config)
  if config.export.enabled:  # refuse an export folder that would replace the inputs before training
    from h3jax import io_atomic
    io_atomic.check_not_overlapping(_export_dir(config, workdir), (workdir / CKPT_DIR, run.tokenizer_source))
  cfg, labels = run.cfg, run.labels
  schedule = optim.make_schedule(t.lr, t.steps, warmup_steps=t.warmup_steps, decay=t.decay,
                                 end_lr_frac=t.end_lr_frac)
  tx = optim.make_optimizer(labels, schedule, weight_decay=t.weight_decay, clip_norm=t.clip_norm)
  mesh = sharding.mesh_from_config(config.mesh, cfg, batch_size=t.batch_size, grad_accum=t.grad_accum_steps)
  with jax.set_mesh(mesh):  # expert_parallel's shard_map takes the `expert` axis from the context mesh
    return _train(config, workdir, run, cfg, labels, schedule, tx, mesh)


def _train(config, workdir, run, cfg, labels, schedule, tx, mesh) -> dict:
  from h3jax.checkpoint import Checkpointer
  t = config.train
  p_shard = sharding.param_shardings(run.params, mesh)
  params = jax.device_put(run.params, p_shard)
  init_params = params if run.loss.drift_weights and run.loss.drift_mode == "frobenius" else None
  opt_like = jax.eval_shape(tx.init, params)
  o_shard = sharding.tree_shardings_like(opt_like, params, mesh)
  state_shard = {"params": p_shard, "opt_state": o_shard,
                 "step": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}

  ckpt = Checkpointer(workdir / CKPT_DIR, max_to_keep=t.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    like = lambda tree, shard: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shard)
    got = ckpt.restore(start, params_like=like(params, p_shard), opt_state_like=like(opt_like, o_shard))
    state = {"params": got["params"], "opt_state": got["opt_state"],
             "step": jax.device_put(jnp.asarray(start, jnp.int32), state_shard["step"])}
    restore_data(run.train, got.get("extra"), start, workdir / CKPT_DIR)
    if init_params is not None:  # drift reference = the fused init, rebuilt deterministically
      init_params = params
  else:
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_shard)(params)
    if run.train.step != 0:
      raise ValueError(f"fresh run but the data iterator is at step {run.train.step}; pass a new Run")

  batch_like = run.train.batch(run.train.step)
  b_shard = sharding.batch_shardings(batch_like, mesh)
  put = lambda b: jax.device_put(b, b_shard)
  step_fn = jax.jit(step_lib.make_step(cfg, run.loss, labels, tx, accum=t.grad_accum_steps, seed=config.seed,
                                       schedule=schedule),
                    in_shardings=(state_shard, b_shard, None if init_params is None else p_shard),
                    out_shardings=(state_shard, None), donate_argnums=(0,))
  if t.save_hlo:  # the compiled step's HLO (collectives: h3jax.train.hlo_comm); the same executable runs
    step_fn = step_fn.lower(state, put(batch_like), init_params).compile()
    (workdir / HLO_FILE).write_text(step_fn.as_text())
  eval_fn = jax.jit(step_lib.make_eval_step(cfg, run.loss))
  writer = _Writer(workdir, start)
  bar = progress_lib.bar(total=t.steps, initial=start, desc=f"{config.stage}:{workdir.name}", enabled=t.progress,
                         dynamic_ncols=True, mininterval=1.0)
  last_saved = start
  t0, summary = time.time(), {}
  try:
    for s in range(start, t.steps):
      state, m = step_fn(state, put(next(run.train)), init_params)
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      bad = non_finite(m)
      if bad:
        ckpt.wait()
        raise FloatingPointError(
            f"{bad} at step {s + 1}; stopping without saving this state. "
            f"Last good checkpoint: step {last_saved} in {workdir / CKPT_DIR}" if last_saved else
            f"{bad} at step {s + 1}; stopping. No checkpoint was saved "
            f"before it (checkpoint_every={t.checkpoint_every}).")
      writer.write(s + 1, m)
      summary = m
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
      done = s + 1 == t.steps
      if done or (t.checkpoint_every > 0 and (s + 1) % t.checkpoint_every == 0):
        ckpt.save(s + 1, params=state["params"], opt_state=state["opt_state"],
                  extra={"data": run.train.state(), "seed": int(config.seed)}, config=cfg, force=True)
        last_saved = s + 1
      if run.eval is not None and t.eval_every and ((s + 1) % t.eval_every == 0 or done):
        ev = evaluate(eval_fn, state["params"], run.eval, t.eval_batches, put)
        writer.write(s + 1, ev, prefix="eval")
        summary = dict(summary, **{f"eval_{k}": v for k, v in ev.items()})
    ckpt.wait()
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()
  summary.update(steps=t.steps, seconds=time.time() - t0, workdir=str(workdir))
  if config.export.enabled:
    summary["export_dir"] = export(state["params"], cfg, workdir, config, run)
  return dict(summary, params=state["params"], cfg=cfg)


def _export_dir(config, workdir) -> pathlib.Path:
  return pathlib.Path(config.export.out_dir or pathlib.Path(workdir) / "hf")


def export(params, cfg, workdir: pathlib.Path, config, run: stages.Run) -> str:
  """HF folder (LoRA merged; Mixtral for a fused MoE) at export.out_dir or workdir/hf."""
  from h3jax.hf.export import save_pretrained
  out = _export_dir(config, workdir)
  save_pretrained(jax.device_get(params), cfg, out, tokenizer_source=run.tokenizer_source, overwrite=True,
                  inputs=(workdir / CKPT_DIR,))
  return str(out)
