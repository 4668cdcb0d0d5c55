r"""Quickstart on the real SmolLM2-135M-Instruct: 3 experts -> fused MoE -> Stage B -> Mixtral -> answer.

  python -m h3jax.pipeline --config=configs/smollm2_quickstart.py --workdir=runs/quickstart

Needs artifacts/smollm2-135m-instruct (`python -m h3jax.prepare smollm2`) and the shared data.
A few steps per stage on short sequences, so it shows the machinery, not a better model:
Stage A x3 (helpful / harmless / honest: LoRA r=8 alpha=4 on gate/up/down, 4 steps each, chat template,
64 tokens), fusion into a 3-expert top-2 MoE (random router), Stage B (LoRA on attention and every
expert, trainable router, λ=0.01, 4 steps), export to runs/quickstart/fusion/hf as
MixtralForCausalLM, and a greedy answer from the exported folder (also in runs/quickstart/answer.txt).
Expected: "[pipeline] ..." lines and tqdm bars for every stage, losses near SmolLM2's own (~1-3 nats
on the 3H targets), and a fluent answer close to the base model's, since the experts barely moved.
Re-running the command resumes / skips finished stages.
"""

import pathlib

from h3jax.train.defaults import default_config

AXES = ("helpful", "harmless", "honest")
SMOLLM2 = str(pathlib.Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-135m-instruct")


def get_config():
  c = default_config()
  c.stage = "fusion"
  c.model.hf_dir = SMOLLM2
  c.fusion.base_dir = SMOLLM2
  c.fusion.top_k = 2
  c.fusion.dispatch = "capacity"
  c.data.sources = AXES
  c.data.template = "chat"
  c.data.seq_len = 64
  c.data.max_examples = 24
  c.data.eval_fraction = 0.0
  c.lora.targets = ("ffn", "attn")
  c.loss.gate_weight = 0.01
  c.train.steps = 4
  c.train.batch_size = 4
  c.train.lr = 1e-3
  c.train.checkpoint_every = 4
  c.train.eval_every = 0
  c.mesh.data = 1
  c.export.enabled = True
  c.pipeline = dict(axes=AXES, stage_a_steps=4, stage_a_lr=1e-3,
                    prompt="Give me three tips for staying healthy.", max_new_tokens=48)
  return c
