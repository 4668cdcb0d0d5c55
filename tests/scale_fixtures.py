"""Tiny fused-MoE Stage-B problem for the scale-out tests: a random base and four perturbed experts
saved as h3jax checkpoints, and the tiny fusion config pointed at them (4 experts: an expert axis of 4)."""

import json
import pathlib

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
N_EXPERTS = 4


def write_models(root: pathlib.Path, n_experts: int = N_EXPERTS) -> tuple:
  """(base_dir, expert_dirs): the tiny config's random model and n copies with distinct FFNs."""
  from h3jax.checkpoint import Checkpointer
  from h3jax.model import params as params_lib
  from h3jax.train import stages
  from h3jax.train.defaults import load_config_file
  c = load_config_file(REPO / "configs" / "tiny.py", "helpful")
  cfg = stages.tiny_model_config(c.model.tiny)
  base = params_lib.init_params(cfg, jax.random.key(0), "float32")
  dirs = []
  for i in range(n_experts + 1):
    p = base
    if i:  # expert i: the base FFN plus its own random delta
      keys = jax.random.split(jax.random.key(100 + i), 3)
      mlp = {n: {"kernel": w["kernel"] + 0.05 * jax.random.normal(k, w["kernel"].shape)}
             for (n, w), k in zip(sorted(base["layers"]["mlp"].items()), keys)}
      p = dict(base, layers=dict(base["layers"], mlp=mlp))
    d = root / ("base" if not i else f"expert{i}")
    with Checkpointer(d, max_to_keep=1) as ck:
      ck.save(0, params=p, config=cfg, force=True)
      ck.wait()
    dirs.append(str(d))
  return dirs[0], dirs[1:]


def write_data(path: pathlib.Path, n: int = 48) -> str:
  axes = ("helpful", "harmless", "honest")
  rows = [{"instruction": f"question {i} about {axes[i % 3]}?", "response": f"answer {i}: " + "xyz" * (i % 5 + 1),
           "task": i % 3} for i in range(n)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def fusion_overrides(base_dir, expert_dirs, data_path, steps=3, every=0):
  """CLI overrides of configs/tiny.py:fusion for the 4-expert problem (dropless expert_parallel)."""
  dirs = ",".join(f'"{d}"' for d in expert_dirs)
  return [f"--config.fusion.base_dir={base_dir}", f"--config.fusion.expert_dirs=({dirs},)",
          "--config.fusion.expert_names=()", "--config.fusion.dispatch=expert_parallel",
          "--config.fusion.capacity_factor=0.0", f"--config.loss.drift_weights=({'1e-3,' * len(expert_dirs)})",
          f"--config.data.sources=('{data_path}',)", "--config.data.seq_len=32", "--config.train.batch_size=8",
          f"--config.train.steps={steps}", f"--config.train.checkpoint_every={every or steps}",
          "--config.train.eval_every=0", "--config.train.progress=False", "--config.lora.dropout=0.0",
          "--config.export.enabled=False"]


def fusion_config(base_dir, expert_dirs, data_path, steps=3, every=0, **mesh):
  """The same problem as a ConfigDict for in-process runs."""
  from h3jax.train.defaults import load_config_file
  c = load_config_file(REPO / "configs" / "tiny.py", "fusion")
  c.fusion.base_dir = str(base_dir)
  c.fusion.expert_dirs = tuple(expert_dirs)
  c.fusion.expert_names = ()
  c.fusion.dispatch = "expert_parallel"
  c.fusion.capacity_factor = 0.0
  c.loss.drift_weights = (1e-3,) * len(expert_dirs)
  c.data.sources = (str(data_path),)
  c.data.seq_len = 32
  c.train.batch_size = 8
  c.train.steps = steps
  c.train.checkpoint_every = every or steps
  c.train.eval_every = 0
  c.train.progress = False
  c.lora.dropout = 0.0
  c.export.enabled = False
  for k, v in {**dict(data=1, fsdp=1, expert=1, tensor=1), **mesh}.items():
    setattr(c.mesh, k, v)
  return c
