"""h3jax: helpful, harmless, honest fusion of aligned language models in JAX.

Top-level names are imported lazily so that `import h3jax` stays cheap and a
CLI only pays for what it uses.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": ("h3jax.config", "ModelConfig"),
    "RopeConfig": ("h3jax.config", "RopeConfig"),
    "forward": ("h3jax.model.llama", "forward"),
    "init_params": ("h3jax.model.params", "init_params"),
    "load_pretrained": ("h3jax.hf.load", "load_pretrained"),
    "load_model": ("h3jax.hf.loader", "load_model"),
    "save_pretrained": ("h3jax.hf.export", "save_pretrained"),
    "generate": ("h3jax.generation", "generate"),
}


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'h3jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
