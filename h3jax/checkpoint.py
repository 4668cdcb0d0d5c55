"""Orbax checkpoints of a training run: params, optimizer state, step, config, extra state.

One step directory holds four Orbax items: `params` and `opt_state` (array trees,
restorable onto any sharding), `extra` (JSON: data-iterator position, RNG seeds,
metrics) and `config` (the ModelConfig as JSON, so `load_params` and
`python -m h3jax.export` need nothing but the directory).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from h3jax.config import ModelConfig, RopeConfig
from h3jax.model import params as params_lib


def config_to_json(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> ModelConfig:
  d = dict(d)
  d["rope"] = RopeConfig(**d["rope"])
  for k in ("eos_token_id", "expert_names"):
    d[k] = tuple(d.get(k) or ())
  return ModelConfig(**d)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `directory`."""

  def __init__(self, directory, *, max_to_keep: Optional[int] = 3, save_interval_steps: int = 1):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("params", "opt_state", "extra", "config"))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, *, params, opt_state=None, extra: Optional[dict] = None,
           config: Optional[ModelConfig] = None, force: bool = False) -> bool:
    """Saves asynchronously (call `wait()` before reading it back); False if skipped by the interval."""
    items = {"params": ocp.args.StandardSave(params), "extra": ocp.args.JsonSave(extra or {})}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config_to_json(config))
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: Optional[int] = None, *, params_like=None, opt_state_like=None) -> dict:
    """Returns dict(step, params, opt_state, extra, config). `*_like`: trees of arrays or
    jax.ShapeDtypeStruct (with .sharding) giving the dtypes and shardings to restore onto."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
    step_dir = self.directory / str(step)
    present = {p.name for p in step_dir.iterdir()}
    items = {"params": ocp.args.StandardRestore(_abstract(params_like)), "extra": ocp.args.JsonRestore()}
    if "opt_state" in present:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
    if "config" in present:
      items["config"] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    cfg = out.get("config") if "config" in present else None
    return {"step": step, "params": out["params"], "opt_state": out.get("opt_state") if "opt_state" in present
            else None, "extra": out["extra"], "config": config_from_json(cfg) if cfg else None}

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _abstract(tree):
  if tree is None:
    return None
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def load_checkpoint(directory, step: Optional[int] = None) -> dict:
  """dict(step, params, opt_state, extra, config) of a run's checkpoint (default: the latest step);
  errors for a missing directory and for a checkpoint saved without its model config."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():  # checked first: Orbax would create the folder
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  ckpt = Checkpointer(directory, max_to_keep=None)
  try:
    out = ckpt.restore(step)
  finally:
    ckpt.close()
  if out["config"] is None:
    raise ValueError(f"checkpoint {directory}/{out['step']} has no model config; it was saved without "
                     "config=..., so it cannot be exported")
  return out


def load_params(directory, step: Optional[int] = None, dtype: Optional[str] = None) -> Tuple[ModelConfig, Any]:
  """(cfg, params) of a run's checkpoint, for export or evaluation (`h3jax.hf.loader.load_model` reads
  checkpoints through this)."""
  out = load_checkpoint(directory, step)
  params = out["params"]
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  return out["config"], params


def abstract_like(cfg: ModelConfig, dtype="float32", sharding=None):
  """Abstract params for `restore(params_like=...)`, optionally all on one sharding."""
  tree = params_lib.abstract_params(cfg, dtype)
  if sharding is None:
    return tree
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)
