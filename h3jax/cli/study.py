"""`h3jax-study`: the 3H study as one resumable command, same as `python -m h3jax.study`.

The study's command line (flags and main) lives in h3jax/study/__main__.py, which the study's own
stage subprocesses run (`python -m h3jax.study --stage=...`); this is its console script.
"""

from __future__ import annotations

from h3jax.cli import common


def run():
  from h3jax.study import __main__ as study_cli  # defines the study's flags on import
  common.run(study_cli.main, required=["config", "workdir"])
