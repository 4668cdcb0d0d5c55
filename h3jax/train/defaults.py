"""Default training config (ml_collections); configs/*.py start from it and override.

Every field is overridable on the command line: `--config.train.steps=100`.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections


def default_data_root() -> str:
  """$H3JAX_DATA_ROOT, else ../shared/data next to the repo when it exists (as tests/conftest.py)."""
  if os.environ.get("H3JAX_DATA_ROOT"):
    return os.environ["H3JAX_DATA_ROOT"]
  guess = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
  return str(guess) if guess.is_dir() else ""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "sft"  # sft (Stage A) | fusion (Stage B)
  c.seed = 42

  c.model = ml_collections.ConfigDict()
  c.model.hf_dir = ""  # HF folder or h3jax checkpoint; empty: random `tiny` model
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"  # or bfloat16 (norms, softmax, router, loss stay f32)
  # "none" (every activation saved) | "full" (layer inputs only) | "dots" (the unbatched matmuls' outputs;
  # norms, RoPE, SiLU and attention recomputed in the backward) | "auto": "dots" for a dense model whose base
  # weights train, else "none" (train/stages.resolve_remat). Measured on CPU (SmolLM2, interleaved rounds): a
  # full fine-tune step at 8 x 256 took 12.61 s with "dots" against 15.26 s with "none" (faster in 5 of 5
  # rounds): its saved activations are zero-filled, written and read back through stacked buffers, fresh
  # pages every step. A LoRA step saves far fewer (no frozen kernel's input) and gains nothing (11.75 against
  # 11.12 s); the fused 3-expert MoE loses (17.00 / 17.84 against 14.35 / 17.20 s at 4 x 256): its expert
  # matmuls are batched dots, which "dots" recomputes. Where memory is short, "full" keeps the least.
  c.model.remat = "auto"
  c.model.tiny = ml_collections.ConfigDict(dict(
      vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=8, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
      eos_token_id=(2,), pad_token_id=0, rope_theta=10000.0))

  c.fusion = ml_collections.ConfigDict()  # Stage B: h3jax.fusion.build_moe arguments
  c.fusion.base_dir = ""
  c.fusion.expert_dirs = ()
  c.fusion.expert_names = ("helpful", "harmless", "honest")
  c.fusion.router_init = "random"  # random | zeros | hidden
  c.fusion.hidden_prompts = 32  # router_init="hidden": first N training prompts of each expert's source
  c.fusion.top_k = 2
  c.fusion.dispatch = "capacity"  # dense | capacity | ragged | expert_parallel
  c.fusion.capacity_factor = 0.0  # <= 0: dropless
  c.fusion.attn_from = "base"  # base | average
  c.fusion.delta_scale = "lora"  # "one": reference defect #2
  c.fusion.alias_experts = False  # True: reference defect #1
  # A mergekit-moe YAML (h3jax.fusion.moe_config): base, experts, gate init and top_k come from it instead of
  # base_dir / expert_dirs / router_init / top_k; dispatch and capacity_factor still apply.
  c.fusion.moe_config = ""

  c.lora = ml_collections.ConfigDict()  # paper: r=8, alpha=4 (scale 0.5), dropout 0.1
  c.lora.enabled = True
  c.lora.rank = 8
  c.lora.alpha = 4.0
  c.lora.dropout = 0.1
  c.lora.targets = ("ffn",)  # "ffn", "attn" or h3jax.rules patterns over linear-layer paths

  c.loss = ml_collections.ConfigDict()
  c.loss.lm_weight = 1.0
  c.loss.gate_weight = 0.0  # λ
  c.loss.drift_weights = ()  # γ_i, one per expert
  c.loss.drift_mode = "lora_delta"  # frobenius | lora_delta | lora_a_plus_b (#7)
  c.loss.drift_layer_divisor = 0.0  # 0: num_layers; 32 reproduces the reference
  c.loss.gate_mode = "nll"  # nll | double_softmax (#6)
  c.loss.gate_masked = True  # False: unmasked averaging (#6)
  c.loss.balance_weight = 0.0
  c.loss.z_weight = 0.0

  c.data = ml_collections.ConfigDict()  # read through h3jax.data (pipeline.load_records / make_iterator)
  c.data.sources = ("helpful",)  # 3H axis names, "mixture" (all three axes) or JSONL paths
  c.data.tasks = ()  # per-source task labels; empty: the source index if several sources, else each row's `task`
  c.data.task_labels = "per_source"  # cumulative: reference defect #5
  c.data.data_root = default_data_root()
  c.data.max_examples = 0  # per source; 0 = all
  c.data.tokenizer = ""  # "bytes" or an HF folder; empty: the model's folder
  c.data.template = "alpaca"  # alpaca (the paper's) | chat (the tokenizer's template) | plain
  c.data.end_marker = "auto"  # target suffix; auto: "###END" for alpaca (the paper), none for plain / chat
  c.data.add_eos = False  # EOS after the target (chat targets already end with the end-of-turn token)
  c.data.seq_len = 128
  c.data.min_prompt_frac = 0.5  # over-long examples keep >= this share of seq_len for the prompt's end
  c.data.pack = False  # pack same-task examples into rows (positions restart, no cross-attention)
  c.data.eval_fraction = 0.05

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 8
  c.train.grad_accum_steps = 1
  c.train.lr = 5e-4
  c.train.warmup_steps = 0
  c.train.decay = "linear"  # linear | cosine | constant
  c.train.end_lr_frac = 0.0
  c.train.weight_decay = 0.0
  c.train.clip_norm = 1.0
  c.train.trainable = ()  # extra trainable-leaf patterns (h3jax.rules), e.g. "layers/mlp/*"
  c.train.router_trainable = True  # False: reference defect #4
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.train.eval_every = 50
  c.train.eval_batches = 2
  c.train.progress = True
  c.train.save_hlo = False  # write the compiled train step's HLO to workdir/train_step.hlo.txt

  # Device mesh (h3jax/train/sharding.py): sizes multiply to the devices used, -1 = the rest.
  # data: batch split; fsdp: batch + parameters split; expert: batch + MoE experts split
  # (fusion.dispatch="expert_parallel" exchanges tokens by all_to_all); tensor: Megatron matrices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))

  c.export = ml_collections.ConfigDict()
  c.export.enabled = False  # HF folder (LoRA merged; Mixtral for an MoE) at the end
  c.export.out_dir = ""  # empty: workdir/hf
  return c


def load_config_file(path, arg=None) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file (what `--config=path:arg` does), for library callers."""
  spec = importlib.util.spec_from_file_location(f"h3jax_config_{pathlib.Path(path).stem}", str(path))
  if spec is None or not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg is not None else mod.get_config()
