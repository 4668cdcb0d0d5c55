r"""Export an Orbax training checkpoint as an HF folder.

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

Logs show warnings and this tool's progress lines only (Orbax logs hundreds of INFO lines per
checkpoint); `--verbosity=0` shows INFO, `--verbosity=1` debug. Bad input (a missing checkpoint folder, a
non-empty --out) is one `error:` line, exit code 2, and nothing is created.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Optional

from absl import app, flags, logging

from h3jax import checkpoint, io_atomic
from h3jax.hf import export as hf_export

FLAGS = flags.FLAGS


def define_flags():
  """Defines this CLI's flags (only when run as a program, so importing the module
  never collides with other CLIs' flags of the same name)."""
  flags.DEFINE_string("checkpoint", None, "Checkpoint directory (the run's Orbax directory).")
  flags.DEFINE_string("out", None, "Output HF folder.")
  flags.DEFINE_integer("step", None, "Step to export (default: latest).")
  flags.DEFINE_string("tokenizer_source", None, "Folder whose tokenizer files are copied.")
  flags.DEFINE_string("dtype", None, "Tensor dtype written: float32 | bfloat16 | float16 (default: as saved).")
  flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")
  flags.DEFINE_enum("format", "hf", ["hf", "peft"], "hf: full HF folder (LoRA merged); peft: PEFT LoRA adapter.")
  flags.DEFINE_string("base", None, "With --format=peft: the base model folder/name recorded in the adapter.")


def export_checkpoint(checkpoint_dir, out_dir, *, step: Optional[int] = None, tokenizer_source=None,
                      dtype: Optional[str] = None, max_shard_size="5GB", overwrite: bool = False,
                      format: str = "hf", base: Optional[str] = None) -> pathlib.Path:
  out = pathlib.Path(out_dir)
  io_atomic.check_not_overlapping(out, (checkpoint_dir, tokenizer_source))
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
  if not pathlib.Path(checkpoint_dir).is_dir():  # checked first: Orbax would create the folder
    raise FileNotFoundError(f"checkpoint folder not found: {checkpoint_dir} (pass the run's checkpoints/ "
                            f"folder, e.g. runs/NAME/checkpoints)")
  if tokenizer_source and not pathlib.Path(tokenizer_source).is_dir():
    raise FileNotFoundError(f"--tokenizer_source folder not found: {tokenizer_source}")
  if out.exists() and overwrite:
    io_atomic.check_replaceable(out)
  ckpt = checkpoint.Checkpointer(checkpoint_dir, max_to_keep=None)
  try:
    restored = ckpt.restore(step)
  finally:
    ckpt.close()
  cfg = restored["config"]
  if cfg is None:
    raise ValueError(f"checkpoint {checkpoint_dir} step {restored['step']} holds no model config")
  tokenizer_source = tokenizer_source or restored["extra"].get("tokenizer_source")
  if format == "peft":
    from h3jax.hf import adapters
    base = base or tokenizer_source
    if base is not None and pathlib.Path(base, "config.json").is_file():  # nothing but LoRA may have changed
      from h3jax.hf.load import load_pretrained
      adapters.check_only_lora_trained(restored["params"], load_pretrained(base)[1], base)
    return adapters.save_adapter(cfg, restored["params"], out, base_model_name_or_path=base,
                                 overwrite=overwrite)
  if format != "hf":
    raise ValueError(f"unknown export format {format!r}; expected 'hf' or 'peft'")
  print(f"exporting step {restored['step']} of {checkpoint_dir} to {out}", file=sys.stderr, flush=True)
  return hf_export.save_pretrained(restored["params"], cfg, out, max_shard_size=max_shard_size,
                                   tokenizer_source=tokenizer_source, overwrite=overwrite, dtype=dtype,
                                   progress=True, inputs=(checkpoint_dir,))


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # absl's own flag; Orbax logs every restore step at INFO
    logging.set_verbosity(logging.WARNING)
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
  from h3jax.hf.adapters import AdapterError
  try:
    path = export_checkpoint(FLAGS.checkpoint, FLAGS.out, step=FLAGS.step, tokenizer_source=FLAGS.tokenizer_source,
                             dtype=FLAGS.dtype, max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite,
                             format=FLAGS.format, base=FLAGS.base)
  except (AdapterError, io_atomic.UnsafeOutputError, FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
