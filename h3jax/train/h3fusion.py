r"""The whole H^3Fusion chain in one call: Stage A x N -> fuse -> Stage B -> Mixtral export -> answer.

  python -m h3jax.pipeline --config=configs/smollm2_quickstart.py --workdir=runs/quickstart
  python -m h3jax.pipeline --config=configs/tiny.py:pipeline --workdir=/tmp/h3tiny

`run_pipeline(config, workdir)` runs it (the command line is h3jax/cli/pipeline.py). The config is a
Stage-B (`stage="fusion"`) config plus a `pipeline` block:
  pipeline.axes            the experts, in order (3H axis names or JSONL paths)
  pipeline.stage_a_steps / stage_a_lr   Stage A length and learning rate
  pipeline.prompt, max_new_tokens       the question answered by the exported model
Stage A reuses the config's model, data and train blocks with stage="sft",
one data source, FFN-only LoRA and no MoE loss terms. Every stage resumes
from its checkpoints when the command is re-run; finished stages are skipped.
Workdir layout: base/ (random tiny base only), <axis>/checkpoints, fusion/,
fusion/hf (the MixtralForCausalLM folder), answer.txt.
"""

from __future__ import annotations

import copy
import pathlib
import time

from h3jax.train import loop


def _log(msg: str):
  print(f"[pipeline] {msg}", flush=True)


def _tiny_base(config, workdir: pathlib.Path) -> str:
  """Random tiny base model saved as an h3jax checkpoint (h3jax.hf.loader.load_model reads it)."""
  import jax
  from h3jax.checkpoint import Checkpointer
  from h3jax.model import params as params_lib
  from h3jax.train import stages
  out = workdir / "base"
  ckpt = Checkpointer(out, max_to_keep=1)
  try:
    if ckpt.latest_step() is None:
      cfg = stages.tiny_model_config(config.model.tiny)
      ckpt.save(0, params=params_lib.init_params(cfg, jax.random.key(config.seed), config.model.param_dtype),
                config=cfg, force=True)
      ckpt.wait()
  finally:
    ckpt.close()
  return str(out)


def stage_a_config(config, axis_index: int, base_dir: str):
  c = copy.deepcopy(config)
  p = config.pipeline
  with c.unlocked():
    c.stage = "sft"
    c.model.hf_dir = base_dir
    c.data.sources = (p.axes[axis_index],)
    c.data.tasks = (axis_index,)
    c.lora.targets = ("ffn",)  # the paper: gate/up/down only; attention, embeddings, norms frozen
    for k in ("gate_weight", "balance_weight", "z_weight"):
      c.loss[k] = 0.0
    c.loss.drift_weights = ()
    c.train.steps = p.stage_a_steps
    c.train.lr = p.stage_a_lr
    c.train.checkpoint_every = max(p.stage_a_steps, 1)
    c.export.enabled = False
  return c


def _finished(run_dir: pathlib.Path, steps: int) -> bool:
  return (run_dir / "checkpoints" / str(steps)).is_dir()


def answer(export_dir: str, prompt: str, max_new_tokens: int, tokenizer_spec: str,
           template: str = "plain") -> str:
  """Greedy answer of the exported HF folder (its own tokenizer, or bytes for tiny models).

  With the byte tokenizer the prompt is formatted by the training `template` (h3jax.data.format).
  """
  from h3jax import generation
  from h3jax.hf.load import load_pretrained
  cfg, params = load_pretrained(export_dir)
  if tokenizer_spec == "bytes":
    import numpy as np
    from h3jax.data import format as fmt
    from h3jax.data import tokenize as tok_lib
    tok = tok_lib.ByteTokenizer()
    ids = tok.encode(fmt.format_prompt(prompt, tok, template), add_special_tokens=True)
    toks, n = generation.generate_tokens(params, cfg, np.asarray([ids]), np.ones((1, len(ids))),
                                         max_new_tokens=max_new_tokens, eos_token_ids=(tok.eos_token_id,))
    return tok.decode(toks[0, :n[0]])
  from h3jax.hf import loader
  tok = loader.load_tokenizer(export_dir)
  return generation.generate(params, cfg, tok, prompt, chat=bool(getattr(tok, "chat_template", None)),
                             max_new_tokens=max_new_tokens)


def run_pipeline(config, workdir) -> dict:
  """Run (or resume) every stage; returns {"experts", "fusion", "export_dir", "answer", "seconds"}."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  t0, p = time.time(), config.pipeline
  if p.get("compile_cache", True):  # Stage A experts share shapes: compile once, reuse for the others
    from h3jax import compile_cache
    compile_cache.enable(workdir / "jax_cache", min_compile_secs=1.0)
  if len(p.axes) < 2:
    raise ValueError(f"pipeline.axes needs at least 2 experts, got {list(p.axes)}")
  base_dir = config.model.hf_dir or _tiny_base(config, workdir)
  expert_dirs = []
  for i, axis in enumerate(p.axes):
    name = pathlib.Path(axis).stem
    run_dir = workdir / name
    if _finished(run_dir, p.stage_a_steps):
      _log(f"stage A [{i + 1}/{len(p.axes)}] {name}: already trained, skipping")
    else:
      _log(f"stage A [{i + 1}/{len(p.axes)}] {name}: LoRA SFT from {base_dir}, {p.stage_a_steps} steps")
      out = loop.train_and_evaluate(stage_a_config(config, i, base_dir), run_dir)
      _log(f"stage A {name}: loss {out.get('loss', float('nan')):.4f} in {out['seconds']:.0f}s")
    expert_dirs.append(str(run_dir / "checkpoints"))
  c = copy.deepcopy(config)
  with c.unlocked():
    c.stage = "fusion"
    c.fusion.base_dir = base_dir
    c.fusion.expert_dirs = tuple(expert_dirs)
    c.data.sources = tuple(p.axes)
    c.data.tasks = ()
    c.export.enabled = True
  _log(f"fuse {len(expert_dirs)} experts (top-{c.fusion.top_k}, router {c.fusion.router_init}) "
       f"and run stage B for {c.train.steps} steps")
  out = loop.train_and_evaluate(c, workdir / "fusion")
  export_dir = out["export_dir"]
  _log(f"stage B: loss {out.get('loss', float('nan')):.4f}, router_acc {out.get('router_acc', float('nan')):.2f}; "
       f"Mixtral folder: {export_dir}")
  text = answer(export_dir, p.prompt, p.max_new_tokens, c.data.tokenizer or base_dir, c.data.template)
  (workdir / "answer.txt").write_text(f"Q: {p.prompt}\nA: {text}\n")
  _log(f"Q: {p.prompt}\n[pipeline] A: {text}")
  _log(f"done in {time.time() - t0:.0f}s")
  return {"experts": expert_dirs, "fusion": str(workdir / "fusion"), "export_dir": export_dir, "answer": text,
          "seconds": time.time() - t0}
