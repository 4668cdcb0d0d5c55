"""`h3jax-manifest`: write or check the dataset manifest, same as `python -m h3jax.data.manifest`.

The command's flags and main live in h3jax/data/manifest.py beside the manifest code.
"""

from __future__ import annotations

from h3jax.cli import common


def run():
  from h3jax.data import manifest
  common.run(manifest.main, manifest.define_flags)
