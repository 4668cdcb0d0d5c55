r"""`h3jax-extract-lora` / `python -m h3jax.extract_lora`: a PEFT LoRA adapter from a fine-tuned model.

  python -m h3jax.extract_lora --base B --model M --rank R --out DIR \
      [--rank_pattern 'mlp\..*_proj=16' ...] [--embed save|skip] [--overwrite]

Like `mergekit-extract-lora`: truncated SVD of every linear layer's delta M - B (A = sqrt(S) Vh,
B = U sqrt(S), lora_alpha = r); norms and (with --embed=save, mergekit's default) embeddings
and lm_head are saved at full rank in modules_to_save. The library function is
`h3jax.merging.streaming.extract_lora.extract_lora`.
"""

from __future__ import annotations

from absl import flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("base", None, "Base model HF folder.")
  flags.DEFINE_string("model", None, "Fine-tuned model HF folder (same architecture).")
  flags.DEFINE_integer("rank", None, "LoRA rank (upper bound per module: min(rank, out, in)).")
  flags.DEFINE_string("out", None, "Output adapter folder.")
  flags.DEFINE_multi_string("rank_pattern", [], "REGEX=RANK: rank of the modules whose HF name matches "
                            "(first match wins).")
  flags.DEFINE_enum("embed", "save", ["save", "skip"], "Embeddings / lm_head: full rank in modules_to_save, or "
                    "left out.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


def rank_pattern(items) -> dict:
  """['REGEX=RANK', ...] -> {REGEX: RANK} (the last '=' splits, so a regex may hold '=')."""
  pattern = {}
  for item in items:
    key, sep, value = item.rpartition("=")
    if not sep or not key or not value.isdigit():
      raise ValueError(f"--rank_pattern {item!r}: expected REGEX=RANK")
    pattern[key] = int(value)
  return pattern


def main(argv):
  common.reject_args(argv)
  from h3jax.merging.streaming.extract_lora import extract_lora
  with common.one_line_errors(ValueError, FileExistsError, FileNotFoundError):
    path = extract_lora(FLAGS.base, FLAGS.model, FLAGS.out, FLAGS.rank, rank_pattern=rank_pattern(FLAGS.rank_pattern),
                        embed=FLAGS.embed, overwrite=FLAGS.overwrite)
  print(path)


def run():
  common.run(main, define_flags, required=["base", "model", "rank", "out"])
