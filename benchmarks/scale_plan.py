r"""Capacity plan for Stage B (fused-MoE training) on a device mesh: memory and communication per device.

  python benchmarks/scale_plan.py                                   # the README table (all models x meshes)
  python benchmarks/scale_plan.py --model=llama2-7b-x3 --hw=8xH100 --mesh=fsdp=8
  python benchmarks/scale_plan.py --model=mixtral-8x7b --hw=v5p-64 --mesh=data=2,fsdp=4,expert=8 --json

For a model (SmolLM2-135M x3 experts, Llama-2-7B x3 experts as in the H3Fusion paper, Mixtral-8x7B),
a mesh (h3jax.train.sharding axes data / fsdp / expert / tensor) and a batch, it prints per device:

  params     every leaf of the Stage-B tree (frozen base + experts in --param-dtype, LoRA r on
             q/k/v/o and every expert's gate/up/down in f32, router) divided by the axes that
             `h3jax.train.sharding.PARAM_RULES` split it on (the same table the trainer uses);
  optimizer  Adam mu + nu of the trainable leaves (LoRA + router), sharded like their parameter;
  grads      the trainable leaves' gradients;
  activations  an estimate (not measured): saved activations of every layer for the backward pass
             (or one layer's input per layer with --remat), the f32 logits, and the MoE buffers;
  comm       collective buffer bytes per step, per mesh axis (the quantity of
             h3jax.train.hlo_comm.collective_bytes; ring wire bytes are (g-1)/g of it, x2 for an
             all-reduce):
               expert       4 all_to_all per MoE layer and microbatch (dispatch + return, and their
                            transposes), E x C x D each, C = local tokens (dropless) or the capacity
               batch axes   gradient all-reduce of each trainable leaf over the batch axes it is
                            replicated on; XLA's top_k gathers the [tokens, E] router probabilities
               fsdp         all-gather of the frozen weights it splits: attention twice (forward and
                            backward), experts and lm_head once
               tensor       Megatron estimate, 2 all-reduces of [tokens, D] per layer forward and 2
                            backward (not checked against HLO)
and whether it fits in --hbm-frac of the device memory. tests/test_scale_plan.py checks the
communication model against the compiled HLO of the tiny CPU runs (data x expert, fsdp x expert) within 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Dict, Mapping, Optional

import jax

from h3jax.config import ModelConfig
from h3jax.model import params as params_lib
from h3jax.model.params import flatten_dict
from h3jax.train import lora, optim, sharding

GB = 1e9

MODELS = {  # name: (ModelConfig fields, number of experts)
    "smollm2-135m-x3": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                             num_kv_heads=3, head_dim=64, tie_word_embeddings=True), 3),
    "llama2-7b-x3": (dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                          num_kv_heads=32, head_dim=128, tie_word_embeddings=False), 3),
    "mixtral-8x7b": (dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, tie_word_embeddings=False), 8),
}

HARDWARE = {  # name: (devices, GB of memory per device)
    "8xH100": (8, 80.0),
    "v5e-16": (16, 16.0),
    "v5p-64": (64, 95.0),
}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class Setting:
  model: str
  mesh: Dict[str, int]
  batch_size: int = 32  # global rows per step
  seq_len: int = 1024
  grad_accum: int = 1
  top_k: int = 2
  capacity_factor: float = 0.0  # <= 0: dropless
  lora_rank: int = 8
  lora_dropout: float = 0.0
  param_dtype: str = "bfloat16"
  compute_dtype: str = "bfloat16"
  remat: bool = False
  num_experts: Optional[int] = None  # default: the model's
  fields: Optional[dict] = None  # ModelConfig fields overriding MODELS (the tiny check)


class _Mesh:  # what sharding.param_specs reads of a mesh: its axis sizes
  def __init__(self, shape):
    self.shape = dict(shape)


def model_config(s: Setting) -> ModelConfig:
  fields, E = MODELS[s.model] if s.fields is None else (s.fields, s.num_experts)
  E = s.num_experts or E
  return ModelConfig(**fields, max_position_embeddings=max(s.seq_len, 2048), num_experts=E,
                     num_experts_per_tok=s.top_k, capacity_factor=s.capacity_factor)


def stage_b_tree(cfg: ModelConfig, s: Setting):
  """Abstract Stage-B params: the fused MoE in param_dtype + f32 LoRA on attention and experts."""
  def build():
    p = params_lib.init_params(cfg, jax.random.key(0), s.param_dtype)
    return lora.add_lora(p, lora.FFN_TARGETS + lora.ATTN_TARGETS, s.lora_rank, jax.random.key(1))
  return jax.eval_shape(build)


def _trainable(path: str) -> bool:
  return path.endswith(("lora_a", "lora_b")) or path == "layers/moe/router/kernel"


def _split(spec, mesh: Mapping[str, int]) -> int:
  n = 1
  for ax in spec:
    for a in (ax if isinstance(ax, tuple) else (ax,) if ax else ()):
      n *= mesh[a]
  return n


def _key(axes, mesh) -> Optional[str]:
  axes = [a for a in sharding.AXES if a in axes and mesh[a] > 1]
  return "+".join(axes) or None


def plan(s: Setting) -> dict:
  if any(v < 1 for v in s.mesh.values()):
    raise ValueError(f"give every axis size (no -1) to plan a mesh, got {s.mesh}")
  mesh = sharding.resolve_axes(s.mesh, math.prod(s.mesh.values()))
  cfg = model_config(s)
  sharding.check_mesh(mesh, num_experts=cfg.num_experts, batch_size=s.batch_size, grad_accum=s.grad_accum)
  tree = stage_b_tree(cfg, s)
  specs = flatten_dict(sharding.param_specs(tree, _Mesh(mesh)))
  flat = flatten_dict(tree)
  n_dev = math.prod(mesh.values())
  batch_axes = [a for a in sharding.BATCH_AXES if mesh[a] > 1]
  act_b = _BYTES[s.compute_dtype]
  L, D, F, E, k, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                      cfg.num_experts_per_tok, cfg.vocab_size)
  H = cfg.num_heads
  m = mesh["expert"]

  mem = {"params": 0.0, "optimizer": 0.0, "grads": 0.0}
  comm: Dict[str, float] = {}
  add = lambda key, b: key and comm.__setitem__(key, comm.get(key, 0.0) + b)
  n_params = n_train = 0
  for path_t, leaf in flat.items():
    path = optim.path_str(path_t)
    spec = specs[path_t]
    full = math.prod(leaf.shape) * leaf.dtype.itemsize
    shard = full / _split(spec, mesh)
    mem["params"] += shard
    n_params += math.prod(leaf.shape)
    named = {a for ax in spec for a in (ax if isinstance(ax, tuple) else (ax,) if ax else ())}
    if _trainable(path):
      n_train += math.prod(leaf.shape)
      mem["optimizer"] += 2 * shard
      mem["grads"] += shard
      add(_key([a for a in batch_axes if a not in named], mesh), shard)  # gradient all-reduce
    elif "fsdp" in named:  # frozen weight gathered over fsdp where it is used
      gathered = shard * mesh["fsdp"]
      times = 1 if path.startswith(("layers/moe/experts/", "lm_head/")) else 2
      add("fsdp", s.grad_accum * times * gathered)

  tokens = s.batch_size * s.seq_len  # per step, global
  n_mb = tokens / s.grad_accum / math.prod(mesh[a] for a in sharding.BATCH_AXES)  # per device per microbatch
  n_loc = tokens / s.grad_accum / n_dev  # what each device routes inside expert_parallel
  C = n_loc if s.capacity_factor <= 0 else min(n_loc, math.ceil(s.capacity_factor * n_loc * k / E))
  if m > 1:
    add("expert", s.grad_accum * 4 * L * E * C * D * act_b)
    if s.lora_dropout > 0:  # bool keep masks travel with the tokens (forward only)
      add("expert", s.grad_accum * L * E * C * (2 * D + F))
  if batch_axes:  # top_k of the sharded router probabilities gathers them (f32)
    add(_key(batch_axes, mesh), s.grad_accum * L * (tokens / s.grad_accum) * E * 4)
  if mesh["tensor"] > 1:
    add("tensor", s.grad_accum * 4 * L * n_mb * D * act_b)

  # activations per device (estimate): per layer, per microbatch token: attention in/out, q/k/v,
  # the f32 scores (H x T), and k copies of the expert inputs / hidden (3F) / outputs in the buffers
  per_tok_layer = act_b * (6 * D + 3 * D + k * (2 * D + 3 * F)) + 4 * 2 * H * s.seq_len / mesh["tensor"]
  if s.remat:
    act = n_mb * (L * D * act_b + per_tok_layer)
  else:
    act = n_mb * L * per_tok_layer
  act += n_mb * V * 4 * 2 / mesh["tensor"]  # f32 logits and their log-softmax
  mem["activations"] = act
  total = sum(mem.values())
  return {"model": s.model, "mesh": {a: mesh[a] for a in sharding.AXES if mesh[a] > 1} or {"data": 1},
          "devices": n_dev, "params_total_B": n_params / 1e9, "trainable_M": n_train / 1e6,
          "batch_size": s.batch_size, "tokens_per_step": tokens, "capacity_slots": C,
          "memory_GB": {k_: v / GB for k_, v in mem.items()}, "total_GB": total / GB,
          "comm_MB": {k_: v / 1e6 for k_, v in sorted(comm.items())}, "comm_bytes": comm}


def default_mesh(model: str, devices: int) -> Dict[str, int]:
  """Experts on the expert axis as far as the devices allow, the rest fsdp (memory first)."""
  E = MODELS[model][1]
  m = math.gcd(E, devices)
  return {"data": 1, "fsdp": devices // m, "expert": m, "tensor": 1}


def parse_mesh(text: str) -> Dict[str, int]:
  out = {a: 1 for a in sharding.AXES}
  for part in filter(None, text.split(",")):
    a, v = part.split("=")
    out[a.strip()] = int(v)
  return out


def table(rows, hbm) -> str:
  lines = ["| model | hardware | mesh | batch | params GB | optim+grads GB | activations GB | total GB | fits | "
           "comm MB/step per axis |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r, (hw, gb) in zip(rows, hbm):
    mg = r["memory_GB"]
    mesh = " ".join(f"{a}={v}" for a, v in r["mesh"].items())
    comm = ", ".join(f"{a} {v:,.0f}" for a, v in r["comm_MB"].items())
    fits = "yes" if r["total_GB"] <= gb else "no"
    seq = r["tokens_per_step"] // r["batch_size"]
    lines.append(f"| {r['model']} | {hw} | {mesh} | {r['batch_size']}x{seq} | {mg['params']:.2f} | "
                 f"{mg['optimizer'] + mg['grads']:.3f} | {mg['activations']:.2f} | {r['total_GB']:.2f} | {fits} | "
                 f"{comm} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=sorted(MODELS), default=None, help="default: all")
  ap.add_argument("--hw", choices=sorted(HARDWARE), default=None, help="default: all")
  ap.add_argument("--mesh", default="", help="e.g. data=2,fsdp=4,expert=8 (default: experts on expert, rest fsdp)")
  ap.add_argument("--batch-size", type=int, default=0, help="global rows; 0: 4 per batch shard")
  ap.add_argument("--seq-len", type=int, default=1024)
  ap.add_argument("--grad-accum", type=int, default=1)
  ap.add_argument("--capacity-factor", type=float, default=0.0)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--hbm-frac", type=float, default=0.9, help="share of device memory usable")
  ap.add_argument("--json", action="store_true")
  a = ap.parse_args(argv)
  rows, hbm = [], []
  for model in ([a.model] if a.model else MODELS):
    for hw in ([a.hw] if a.hw else HARDWARE):
      n, gb = HARDWARE[hw]
      mesh = parse_mesh(a.mesh) if a.mesh else default_mesh(model, n)
      if math.prod(mesh.values()) != n:
        sys.exit(f"error: mesh {mesh} has {math.prod(mesh.values())} devices; {hw} has {n}")
      rows_ = a.batch_size or 4 * math.prod(mesh.get(x, 1) for x in sharding.BATCH_AXES)
      s = Setting(model, mesh, batch_size=rows_, seq_len=a.seq_len, grad_accum=a.grad_accum,
                  capacity_factor=a.capacity_factor, remat=a.remat)
      try:
        r = plan(s)
      except ValueError as e:
        sys.exit(f"error: {model} on {hw}: {e}")
      r["hardware"], r["fits"] = hw, r["total_GB"] <= a.hbm_frac * gb
      r.pop("comm_bytes")
      rows.append(r)
      hbm.append((hw, a.hbm_frac * gb))
  if a.json:
    for r in rows:
      print(json.dumps(r))
  else:
    print(f"Stage B (LoRA r=8 on attention + experts, router trainable), batch "
          f"{a.batch_size or '4 rows per batch shard'} x {a.seq_len} tokens, bf16 weights, dropless, "
          f"remat={'full' if a.remat else 'none'}; fits = total <= "
          f"{a.hbm_frac:.0%} of device memory")
    print(table(rows, hbm))


if __name__ == "__main__":
  main()
