"""Out-of-core merging of HF folders: safetensors in, sharded safetensors out, one tensor at a time.

  config        mergekit 0.1.5 YAML (read unchanged) and ml_collections `.py` files -> `MergeSpec`
  spec          `MergeSpec`, `Rule`, mergekit's method tables, per-tensor keyword arguments
  settings      mergekit's parameter syntax (scalars, layer gradients, filters) resolved per tensor
  inputs        input checkpoints (HF folders, raw safetensors, `MODEL+ADAPTER`), checks, side files
  plan          per-tensor plan and checks, written dtypes, the host-memory budget
  prepass       whole-model statistics some methods need (global TIES trim, RESM sparsity range)
  host_topk     mergekit TIES with its top-k cuts found on the host
  driver        `run_merge` / `merge_from_config`: the pipelined read -> merge -> write loop
  vocab         vocabulary alignment (`tokenizer_source`, mergekit's `tokenizer:` block)
  slices        passthrough layer stacking (mergekit `slices`)
  extract_lora  (base, fine-tuned) folders -> a PEFT adapter, like `mergekit-extract-lora`

The per-tensor kernels are the pure methods of `h3jax.merging`; this package only schedules them
over files. `python -m h3jax.merge` (h3jax/cli/merge.py) is its command line.
"""

from h3jax.merging.streaming.config import load_config
from h3jax.merging.streaming.driver import merge_from_config, run_merge
from h3jax.merging.streaming.inputs import MergeError
from h3jax.merging.streaming.settings import MergeConfigError
from h3jax.merging.streaming.spec import MergeSpec, Rule

__all__ = ["load_config", "merge_from_config", "run_merge", "MergeError", "MergeConfigError", "MergeSpec",
           "Rule"]
