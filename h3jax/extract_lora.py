r"""Extract a PEFT LoRA adapter from a fine-tuned model (like `mergekit-extract-lora`).

  python -m h3jax.extract_lora --base B --model M --rank R --out DIR \
      [--rank_pattern 'mlp\..*_proj=16' ...] [--embed save|skip] [--overwrite]

Truncated SVD of every linear layer's delta M - B (A = sqrt(S) Vh, B = U sqrt(S),
lora_alpha = r); norms and (with --embed=save, mergekit's default) embeddings
and lm_head are saved at full rank in modules_to_save. Details:
h3jax/merging/streaming/extract_lora.py.
"""

from __future__ import annotations

import sys

from absl import app, flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from h3jax.merging.streaming.extract_lora import extract_lora
  try:
    pattern = {}
    for item in FLAGS.rank_pattern:
      key, sep, value = item.rpartition("=")
      if not sep or not key or not value.isdigit():
        raise ValueError(f"--rank_pattern {item!r}: expected REGEX=RANK")
      pattern[key] = int(value)
    path = extract_lora(FLAGS.base, FLAGS.model, FLAGS.out, FLAGS.rank, rank_pattern=pattern, embed=FLAGS.embed,
                        overwrite=FLAGS.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(path)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["base", "model", "rank", "out"])
  app.run(main)
