r"""`h3jax-export` / `python -m h3jax.export`: an Orbax training checkpoint as an HF folder.

  python -m h3jax.export --checkpoint workdirs/run/checkpoints --out exported/ \
      --tokenizer_source artifacts/smollm2-135m-instruct

Dense models come out as Llama/Mistral/Qwen2, fused MoE models as
MixtralForCausalLM; LoRA is merged into the weights. Without --step the latest
checkpoint is used. Without --tokenizer_source, the `tokenizer_source` recorded
in the checkpoint's extra state (if any) is used.

  python -m h3jax.export --checkpoint workdirs/helpful/checkpoints --out helpful_peft/ \
      --format=peft --base artifacts/smollm2-135m-instruct

writes a Stage A LoRA run as a PEFT adapter folder instead (adapter_config.json
+ adapter_model.safetensors; `peft.PeftModel.from_pretrained(base, out)`), with
--base recorded as its base_model_name_or_path. Only the LoRA factors are
written, so the run must have trained nothing else (see h3jax.hf.adapters).
The library function is `h3jax.hf.export.export_checkpoint`.

Logs show warnings and this tool's progress lines only (Orbax logs hundreds of INFO lines per
checkpoint); `--verbosity=0` shows INFO, `--verbosity=1` debug. Bad input (a missing checkpoint folder, a
non-empty --out) is one `error:` line, exit code 2, and nothing is created.
"""

from __future__ import annotations

from absl import app, flags

from h3jax.cli import common

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory (the run's Orbax directory).")
  flags.DEFINE_string("out", None, "Output HF folder.")
  flags.DEFINE_integer("step", None, "Step to export (default: latest).")
  flags.DEFINE_string("tokenizer_source", None, "Folder whose tokenizer files are copied.")
  flags.DEFINE_string("dtype", None, "Tensor dtype written: float32 | bfloat16 | float16 (default: as saved).")
  flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  flags.DEFINE_enum("format", "hf", ["hf", "peft"], "hf: full HF folder (LoRA merged); peft: PEFT LoRA adapter.")
  flags.DEFINE_string("base", None, "With --format=peft: the base model folder/name recorded in the adapter.")


def main(argv):
  del argv
  common.quiet_logs(keep_explicit_verbosity=True)  # Orbax logs every restore step at INFO
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
  from h3jax import io_atomic
  from h3jax.hf.adapters import AdapterError
  from h3jax.hf.export import export_checkpoint
  with common.one_line_errors(AdapterError, io_atomic.UnsafeOutputError, FileExistsError, FileNotFoundError,
                              ValueError):
    path = export_checkpoint(FLAGS.checkpoint, FLAGS.out, step=FLAGS.step, tokenizer_source=FLAGS.tokenizer_source,
                             dtype=FLAGS.dtype, max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite,
                             format=FLAGS.format, base=FLAGS.base)
  print(path)


def run():
  common.run(main, define_flags)
