"""Tiny random checkpoints for the merge driver / CLI / oracle tests (numpy only, no torch).

`write_llama(dir, tensors, tied)` writes an HF Llama folder (config.json +
model.safetensors) that transformers and mergekit load; `llama_family(...)`
makes a base plus experts = base + Gaussian deltas of distinct scales with a few
heavy-tailed (Student-t) outliers, so no top-k ties occur.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
from safetensors.numpy import load_file, save_file

REPO = pathlib.Path(__file__).resolve().parents[1]
MERGEKIT_PY = REPO / ".venv-mergekit" / "bin" / "python"
FUSIONBENCH_PY = REPO / ".venv-fusionbench" / "bin" / "python"

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def llama_config(tied: bool, **over) -> dict:
  c = dict(LLAMA, **over)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
      "rope_theta": 10000.0, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
      "dtype": "float32", **c,
  }


def llama_shapes(cfg: dict) -> dict:
  V, D, F = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
  H, K, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
        p + "self_attn.q_proj.weight": (H * Dh, D), p + "self_attn.k_proj.weight": (K * Dh, D),
        p + "self_attn.v_proj.weight": (K * Dh, D), p + "self_attn.o_proj.weight": (D, H * Dh),
        p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
        p + "mlp.down_proj.weight": (D, F),
    })
  if not cfg["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (V, D)
  return shapes


def random_base(shapes: dict, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in shapes.items():
    if len(shape) == 1:
      out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return out


def perturb(base: dict, seed: int, scale: float, outliers: bool = True) -> dict:
  """base + N(0, scale^2) with a Student-t (df 2) tail on ~1% of entries."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, x in base.items():
    d = scale * rng.standard_normal(x.shape)
    if outliers and x.size:
      m = rng.random(x.shape) < 0.01
      d = np.where(m, 5 * scale * rng.standard_t(2, x.shape), d)
    out[name] = (x + d).astype(np.float32)
  return out


def write_llama(path, tensors: dict, cfg: dict) -> str:
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg, indent=2))
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  return str(path)


def llama_family(root, n_models: int = 3, tied: bool = False, seed: int = 0, scales=None):
  """(base_dir, [model_dirs], cfg): a base and experts with distinct delta scales."""
  root = pathlib.Path(root)
  cfg = llama_config(tied)
  base = random_base(llama_shapes(cfg), seed)
  scales = scales or [0.01 * (1 + 0.37 * i) for i in range(n_models)]
  base_dir = write_llama(root / "base", base, cfg)
  dirs = [write_llama(root / f"m{i}", perturb(base, seed + 100 + i, s), cfg) for i, s in enumerate(scales)]
  return base_dir, dirs, cfg


RAW_SHAPES = {"w_a": (40, 24), "w_b": (24, 40), "vec": (40,), "cube": (3, 8, 6), "empty": (0, 5),
              "scalar_like": (1,)}


def raw_family(root, n_models: int = 3, seed: int = 0):
  """Raw single-file safetensors with assorted shapes: (base_file, [model_files])."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  base = random_base(RAW_SHAPES, seed)
  files = []
  for i, t in enumerate([base] + [perturb(base, seed + 200 + i, 0.02 * (1 + 0.41 * i)) for i in range(n_models)]):
    f = root / ("base.safetensors" if i == 0 else f"m{i - 1}.safetensors")
    save_file(t, str(f), metadata={"format": "pt"})
    files.append(str(f))
  return files[0], files[1:]


def spec(method, base, models, params=None, model_params=None, **kw):
  """The driver's MergeSpec of a py-config: `params` the method's, `model_params` one dict per model."""
  from h3jax.merging.streaming import config as mcfg
  return mcfg.from_py_config(dict(merge_method=method, base_model=base,
                                  models=[dict(model=m, parameters=(model_params or [{}] * len(models))[i])
                                          for i, m in enumerate(models)],
                                  parameters=params or {}, **kw))


def read_tensors(path) -> dict:
  """All tensors of an output folder (single file or sharded) as float32 numpy."""
  path = pathlib.Path(path)
  out = {}
  files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
  for f in files:
    out.update({k: np.asarray(v, np.float32) for k, v in load_file(str(f)).items()})
  return out


_ORACLE_ENV = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONWARNINGS": "ignore", "HOME": str(REPO)}


def run_oracle(python, script: str, *args, timeout=900):
  """Runs `script` (Python source) with an oracle venv's interpreter; raises with its stderr."""
  r = subprocess.run([str(python), "-c", script, *map(str, args)], capture_output=True, text=True,
                     timeout=timeout, env=_ORACLE_ENV)
  if r.returncode:
    raise RuntimeError(f"oracle failed ({python}):\n{r.stderr[-4000:]}")
  return r.stdout


def start_oracle(python, script: str, *args) -> subprocess.Popen:
  """`run_oracle` in the background (the caller works meanwhile); finish with `wait_oracle`."""
  return subprocess.Popen([str(python), "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=_ORACLE_ENV)


def wait_oracle(proc: subprocess.Popen, timeout=900) -> str:
  out, err = proc.communicate(timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"oracle failed ({proc.args[0]}):\n{err[-4000:]}")
  return out


# Runs mergekit 0.1.5 on a list of jobs [(yaml_text, out_dir, raw)] in one process:
# HF folders via mergekit.merge.run_merge (what mergekit-yaml calls), raw files via
# the mergekit-pytorch planner.
MERGEKIT_BATCH = r"""
import json, sys, yaml, logging
logging.disable(logging.WARNING)
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit.graph import Executor
from mergekit.scripts import merge_raw_pytorch as raw
jobs = json.load(open(sys.argv[1]))
for job in jobs:
  opts = MergeOptions(device="cpu", copy_tokenizer=False, random_seed=job.get("seed", 0),
                      lazy_unpickle=False, write_model_card=False, quiet=True,
                      lora_merge_cache=job.get("lora_cache"))
  cfg = yaml.safe_load(job["yaml"])
  if job.get("raw"):
    c = raw.RawPyTorchMergeConfig.model_validate(cfg)
    tasks = raw.plan_flat_merge(c, job["out"], False, False, opts)
    Executor(tasks, math_device="cpu", storage_device="cpu").execute()
  else:
    run_merge(MergeConfiguration.model_validate(cfg), job["out"], options=opts)
print("ok", len(jobs))
"""


# Runs fusion-bench 0.2.33 on raw safetensors (base + models) wrapped as torch modules.
# argv: jobs.json = {"base": file, "models": [files], "out": dir} or a list of such jobs (one
# process: imports cost ~15 s); writes one safetensors file per algorithm (EMR: unified vector,
# masks, rescalers).
FUSIONBENCH_BATCH = r"""
import json, sys, os, contextlib, io, logging
logging.disable(logging.WARNING)
import numpy as np, torch
from safetensors.numpy import load_file, save_file
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.method import TaskSingularVectorMerging, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.method.isotropic_merging import ISO_C_Merge, ISO_CTS_Merge
from fusion_bench.method.emr_merging.utils import emr_merge
jobs = json.load(open(sys.argv[1]))
class Flat(torch.nn.Module):
  def __init__(self, sd):
    super().__init__()
    for k, v in sd.items():
      self.register_parameter(k.replace(".", "__"), torch.nn.Parameter(torch.from_numpy(np.array(v))))
def run_job(job):
  base = load_file(job["base"]); models = [load_file(f) for f in job["models"]]
  def pool():
    return BaseModelPool({"_pretrained_": Flat(base), **{f"m{i}": Flat(m) for i, m in enumerate(models)}})
  def save(name, module):
    sd = {k.replace("__", "."): v.detach().numpy().copy() for k, v in module.state_dict().items()}
    save_file(sd, os.path.join(job["out"], name + ".safetensors"))
  algos = {
    "tsv_m": TaskSingularVectorMerging(alpha=1.0, exclude_keys=[]),
    "tsv_m_alpha": TaskSingularVectorMerging(alpha=0.6, exclude_keys=[]),
    "iso_c": ISO_C_Merge(scaling_factor=1.0),
    "iso_cts": ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8),
    "ties_sum": TiesMergingAlgorithm(scaling_factor=0.7, threshold=20, remove_keys=[], merge_func="sum"),
    "ties_mean": TiesMergingAlgorithm(scaling_factor=1.0, threshold=30, remove_keys=[], merge_func="mean"),
    "task_arithmetic": TaskArithmeticAlgorithm(scaling_factor=0.3),
  }
  for name, algo in algos.items():
    with contextlib.redirect_stdout(io.StringIO()):
      save(name, algo.run(pool()))
  tvs = [{k: torch.from_numpy(m[k] - base[k]) for k in base} for m in models]
  with contextlib.redirect_stdout(io.StringIO()):
    uni, masks, rescalers = emr_merge(tvs)
  out = {"uni." + k: v.numpy() for k, v in uni.items()}
  for k, m in masks.items():
    for i in range(len(models)):
      out[f"mask{i}." + k] = m[i].float().numpy()
  out["rescalers"] = np.asarray([float(r) for r in rescalers], np.float32)
  save_file(out, os.path.join(job["out"], "emr.safetensors"))
for job in (jobs if isinstance(jobs, list) else [jobs]):
  run_job(job)
print("ok")
"""
