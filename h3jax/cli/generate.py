r"""`h3jax-generate` / `python -m h3jax.generate`: generate text with a model.

  python -m h3jax.generate --model artifacts/smollm2-135m-instruct --chat \
      --prompt "Give me three tips for staying healthy." --max_new_tokens 64

--model is anything `h3jax.hf.loader.load_model` reads (an HF folder, a PEFT adapter folder,
BASE+ADAPTER, a training workdir). Sampling: --temperature 0 is greedy; --top_k/--top_p/--seed
otherwise. The library function is `h3jax.generate` (h3jax.generation.generate).
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("model", None, "HF model folder (config.json, safetensors, tokenizer), PEFT "
                      "adapter folder or BASE+ADAPTER.")
  flags.DEFINE_multi_string("prompt", None, "Prompt; repeat the flag for a batch.")
  flags.DEFINE_bool("chat", False, "Wrap prompts in the tokenizer's chat template.")
  flags.DEFINE_string("system", None, "Optional system message (with --chat).")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "0 disables top-k filtering.")
  flags.DEFINE_float("top_p", 1.0, "1 disables nucleus filtering.")
  flags.DEFINE_float("repetition_penalty", 1.0, "transformers' repetition penalty (1 = off).")
  flags.DEFINE_bool("penalize_eos", True, "Apply the repetition penalty to EOS tokens too (transformers); "
                    "--nopenalize_eos lets chat answers end (the prompt holds the end-of-turn token).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_multi_string("stop", [], "Stop string(s).")
  flags.DEFINE_integer("batch_size", 8, "Prompts per batch.")
  flags.DEFINE_string("dtype", "float32", "Parameter/compute dtype: float32 | bfloat16.")


def main(argv):
  del argv
  if not FLAGS.model or not FLAGS.prompt:
    raise app.UsageError("--model and --prompt are required")
  from h3jax import generation
  from h3jax.hf import loader
  t0 = time.time()
  cfg, params = loader.load_model(FLAGS.model, FLAGS.dtype)
  cfg, tokenizer = cfg.replace(dtype=FLAGS.dtype), loader.load_tokenizer(FLAGS.model)
  logging.info("loaded %s in %.1fs", FLAGS.model, time.time() - t0)
  t0 = time.time()
  outs = generation.generate(params, cfg, tokenizer, FLAGS.prompt, chat=FLAGS.chat, system=FLAGS.system,
                             max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                             top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                             repetition_penalty=FLAGS.repetition_penalty, penalize_eos=FLAGS.penalize_eos,
                             stop_strings=tuple(FLAGS.stop), batch_size=FLAGS.batch_size)
  logging.info("generated %d completions in %.1fs", len(outs), time.time() - t0)
  for prompt, out in zip(FLAGS.prompt, outs):
    print(f"### prompt\n{prompt}\n### completion\n{out}\n")


def run():
  common.run(main, define_flags)
