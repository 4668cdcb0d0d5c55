r"""Generate text with an HF-format model folder.

  python -m h3jax.generate --model artifacts/smollm2-135m-instruct --chat \
      --prompt "Give me three tips for staying healthy." --max_new_tokens 64

Sampling: --temperature 0 is greedy; --top_k/--top_p/--seed otherwise.
The library function is `h3jax.generate` (h3jax.generation.generate); this
module is also callable as that function, so `import h3jax.generate` cannot
shadow it.
"""

from __future__ import annotations

import sys
import time
import types

from absl import app, flags, logging

from h3jax import generation
from h3jax.hf import loader

FLAGS = flags.FLAGS


def define_flags():
  """Defines this CLI's flags (only when run as a program, so importing the module
  never collides with other CLIs' flags of the same name)."""
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


def run(model: str, prompts, **kw) -> list:
  t0 = time.time()
  dtype = kw.pop("dtype", "float32")
  cfg, params = loader.load_model(model, dtype)
  cfg, tokenizer = cfg.replace(dtype=dtype), loader.load_tokenizer(model)
  logging.info("loaded %s in %.1fs", model, time.time() - t0)
  t0 = time.time()
  outs = generation.generate(params, cfg, tokenizer, prompts, **kw)
  logging.info("generated %d completions in %.1fs", len(outs), time.time() - t0)
  return outs


def main(argv):
  del argv
  if not FLAGS.model or not FLAGS.prompt:
    raise app.UsageError("--model and --prompt are required")
  outs = run(FLAGS.model, FLAGS.prompt, chat=FLAGS.chat, system=FLAGS.system,
             max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
             top_p=FLAGS.top_p, seed=FLAGS.seed, repetition_penalty=FLAGS.repetition_penalty,
             penalize_eos=FLAGS.penalize_eos,
             stop_strings=tuple(FLAGS.stop),
             batch_size=FLAGS.batch_size, dtype=FLAGS.dtype)
  for prompt, out in zip(FLAGS.prompt, outs):
    print(f"### prompt\n{prompt}\n### completion\n{out}\n")


class _CallableModule(types.ModuleType):
  def __call__(self, *args, **kwargs):
    return generation.generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  define_flags()
  app.run(main)
