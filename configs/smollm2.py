r"""SmolLM2-135M-Instruct H^3Fusion, the paper's recipe at small scale (not a quick run).

Needs the model folder: `python -m h3jax.prepare smollm2` (-> artifacts/smollm2-135m-instruct).
Stage A, one expert per axis (LoRA r=8, alpha=4, dropout 0.1 on gate/up/down; lr 5e-4, batch 8,
about 3 epochs of the axis' train split, max length 300, linear decay, clip 1.0, seed 42):
  python -m h3jax.train --config=configs/smollm2.py:helpful --workdir=runs/smollm2/helpful
  (likewise harmless, honest)
Stage B (fresh LoRA on q/k/v/o and every expert's gate/up/down, router trainable, λ=0.01):
  python -m h3jax.train --config=configs/smollm2.py:fusion --workdir=runs/smollm2/fusion \
    --config.fusion.expert_dirs='("runs/smollm2/helpful/checkpoints","runs/smollm2/harmless/checkpoints","runs/smollm2/honest/checkpoints")'
Or everything, resumable, in one command:
  python -m h3jax.pipeline --config=configs/smollm2.py:pipeline --workdir=runs/smollm2
Expected: train/lm_loss of each expert falls over its epochs; Stage B logs router_acc rising above
1/3 and gate_loss falling below ln 3; runs/smollm2/fusion/hf is a MixtralForCausalLM folder.
This is hours on a 2-core CPU (use a GPU: add --config.model.compute_dtype=bfloat16); the
minutes-long demo is configs/smollm2_quickstart.py. Reference-code switches (docs/h3fusion.md):
--config.train.router_trainable=False (#4), --config.loss.gate_mode=double_softmax
--config.loss.gate_masked=False (#6), --config.loss.drift_mode=lora_a_plus_b
--config.loss.drift_layer_divisor=32 (#7), --config.fusion.alias_experts=True (#1),
--config.fusion.delta_scale=one (#2), --config.data.task_labels=cumulative (#5),
--config.data.template=alpaca (the reference prompt format; its targets end in "###END").
--config.data.pack=True packs same-task examples into the 300-token rows (RoPE positions restart per
example and examples do not attend to each other), so short examples waste less compute.
"""

import pathlib

from h3jax.train.defaults import default_config

AXES = ("helpful", "harmless", "honest")
SMOLLM2 = str(pathlib.Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-135m-instruct")
STEPS_3_EPOCHS = {"helpful": 140, "harmless": 435, "honest": 600}  # ~3 epochs at batch 8 (train splits)


def get_config(arg: str = "helpful"):
  c = default_config()
  c.model.hf_dir = SMOLLM2
  c.data.template = "chat"
  c.data.seq_len = 300
  c.train.batch_size = 8
  c.train.lr = 5e-4
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  c.mesh.data = -1
  if arg in AXES:
    c.stage = "sft"
    c.data.sources = (arg,)
    c.data.tasks = (AXES.index(arg),)
    c.train.steps = STEPS_3_EPOCHS[arg]
  elif arg in ("fusion", "pipeline"):
    c.stage = "fusion"
    c.fusion.base_dir = SMOLLM2
    c.data.sources = AXES
    c.lora.targets = ("ffn", "attn")
    c.loss.gate_weight = 0.01
    c.loss.drift_weights = (1e-3, 1e-3, 1e-3)
    c.train.steps = sum(STEPS_3_EPOCHS.values())
    c.export.enabled = True
    c.pipeline = dict(axes=AXES, stage_a_steps=300, stage_a_lr=5e-4,
                      prompt="Give me three tips for staying healthy.", max_new_tokens=128)
  else:
    raise ValueError(f"configs/smollm2.py arg must be one of {AXES + ('fusion', 'pipeline')}, got {arg!r}")
  return c
