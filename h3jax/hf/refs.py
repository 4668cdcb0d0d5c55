"""Model references in merge and MoE configs -> one path string.

A reference is a path, 'MODEL+ADAPTER' (a PEFT adapter read onto MODEL), or
one of mergekit's mapping forms `{model: REF, lora: REF}` and `{path: ...}`.
Shared by `h3jax.merging.streaming.config` and `h3jax.fusion.moe_config`, each raising its own
config error class.
"""

from __future__ import annotations

import pathlib
from typing import Mapping


def model_path(ref, where, error=ValueError) -> str:
  """A model reference -> path string; mergekit's `MODEL+LORA` (or `{model: .., lora: ..}`) stays
  'MODEL+LORA', which the loaders read with the PEFT adapter merged in. Bad references raise
  `error(message)`, the message starting with `where`."""
  if isinstance(ref, Mapping) and "model" in ref:  # mergekit's `{model: ..., lora: ...}` form
    if set(ref) - {"model", "lora"}:
      raise error(f"{where}: a model reference takes 'model' and 'lora', got {sorted(ref)}")
    model = model_path(ref["model"], where, error)
    return model if ref.get("lora") is None else f"{model}+{model_path(ref['lora'], where, error)}"
  if isinstance(ref, Mapping):  # mergekit's `model: {path: ...}` form
    if set(ref) - {"path"} or "path" not in ref:
      raise error(f"{where}: a model reference takes only 'path', got {sorted(ref)}")
    ref = ref["path"]
  if not isinstance(ref, str) or not ref:
    raise error(f"{where}: a model must be a path string, got {ref!r}")
  if "+" in ref and not pathlib.Path(ref).exists():
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
      raise error(f"{where}: cannot parse model reference {ref!r}; expected MODEL or MODEL+LORA")
    from h3jax.hf import adapters  # check the adapter now: one clear error before anything runs
    try:
      adapters.read_adapter(parts[1])
    except adapters.AdapterError as e:
      raise error(f"{where}: {e}") from None
  return ref
