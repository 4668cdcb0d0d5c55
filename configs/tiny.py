r"""Tiny CPU config (random 2-layer D=32 model, byte tokenizer): every stage in seconds.

Stage A, one expert per axis (arg = helpful | harmless | honest):
  python -m h3jax.train --config=configs/tiny.py:helpful --workdir=/tmp/h3tiny/helpful
Stage B on a fused MoE (arg = fusion; give the base and the Stage-A checkpoints):
  python -m h3jax.train --config=configs/tiny.py:fusion --workdir=/tmp/h3tiny/fusion \
    --config.fusion.base_dir=/tmp/h3tiny/base \
    --config.fusion.expert_dirs='("/tmp/h3tiny/helpful/checkpoints","/tmp/h3tiny/harmless/checkpoints","/tmp/h3tiny/honest/checkpoints")'
The whole chain (A x3 -> fuse -> B -> Mixtral export -> generate) is one command:
  python -m h3jax.pipeline --config=configs/tiny.py:pipeline --workdir=/tmp/h3tiny
Expected: finishes in a few minutes on 2 CPU cores; train/lm_loss falls from ~5.6 (ln 259) within
the first tens of steps; Stage B logs gate_loss falling below ln 3 = 1.10 and router_acc above 1/3;
the exported folder loads in transformers as MixtralForCausalLM. Text is gibberish (random tiny model).
Add --config.data.pack=True to pack same-task examples into each 64-token row (fewer, fuller rows).
"""

from h3jax.train.defaults import default_config

AXES = ("helpful", "harmless", "honest")


def get_config(arg: str = "helpful"):
  c = default_config()
  c.model.hf_dir = ""
  c.data.tokenizer = "bytes"
  c.data.template = "plain"
  c.data.add_eos = True  # plain targets have no end marker: EOS teaches the model to stop
  c.data.seq_len = 64
  c.data.max_examples = 64
  c.data.eval_fraction = 0.1
  c.train.steps = 30
  c.train.batch_size = 8
  c.train.lr = 1e-2
  c.train.checkpoint_every = 10
  c.train.eval_every = 10
  c.mesh.data = 1  # tiny batches: one device is fastest
  if arg in AXES:
    c.stage = "sft"
    c.data.sources = (arg,)
    c.data.tasks = (AXES.index(arg),)
  elif arg in ("fusion", "pipeline"):
    c.stage = "fusion"
    c.data.sources = AXES
    c.lora.targets = ("ffn", "attn")
    c.loss.gate_weight = 0.1
    c.loss.drift_weights = (1e-3, 1e-3, 1e-3)
    c.fusion.top_k = 2
    c.export.enabled = True
    c.pipeline = dict(axes=AXES, stage_a_steps=30, stage_a_lr=1e-2, prompt="What is the capital of France?",
                      max_new_tokens=16)
  else:
    raise ValueError(f"configs/tiny.py arg must be one of {AXES + ('fusion', 'pipeline')}, got {arg!r}")
  return c
