"""What every h3jax command line shares: flags defined at run time, config-file flags with `--config.x`
overrides, one-line errors and quiet library logs.

Each command module holds `define_flags()`, `main(argv)` and `run()`; `run()` is its console script
and what `python -m h3jax.<verb>` calls. Flags are defined by `run()`, not at import, so a process may
import several command modules (the tests do) without two of them defining `--config` or `--out`.
"""

from __future__ import annotations

import ast
import contextlib
import pathlib
import sys
from typing import Callable, Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

FLAGS = flags.FLAGS


def run(main: Callable, define_flags: Optional[Callable] = None, *, required: Sequence[str] = ()) -> None:
  """Defines the command's flags, marks `required` ones and runs `main(argv)` under absl (--help, flag
  errors, `main`'s return value as the exit code)."""
  if define_flags is not None:
    define_flags()
  if required:
    flags.mark_flags_as_required(list(required))
  app.run(main)


def define_config(name: str = "config", help_string: str = "Config file (get_config()).", *,
                  lock_config: bool = True, other_files: bool = False):
  """A config-file flag: FLAGS.<name> is the result of the `.py` file's get_config() (`FILE.py:ARG` passes
  ARG), and `--<name>.field=value` overrides any field (ml_collections' config_flags).

  other_files=True is for commands that read other config formats too (a merge takes mergekit YAML):
  a value that is not a `.py` file defining get_config() stays the path string, and the command reads
  it itself; overrides then are an error."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=lock_config)
  if other_files:
    FLAGS[name].parser = _PyOrPathParser(name=name, lock_config=lock_config)
  return holder


class _PyOrPathParser(ConfigFileFlagParser):
  """ConfigFileFlagParser for `.py` files that define get_config(); any other value is kept as given."""

  def parse(self, path):
    file = str(path).split(":", 1)[0]
    if file.endswith(".py") and pathlib.Path(file).is_file() and _defines_get_config(file):
      return super().parse(path)
    if any(a.startswith((f"--{self.name}.", f"-{self.name}.")) for a in sys.argv[1:]):
      raise ValueError(f"--{self.name}.FIELD overrides apply to a .py config only, not to {path}")
    return path


def _defines_get_config(file: str) -> bool:
  """Whether the file has a top-level get_config (read without running it: a file without one is left
  to the command, which reports it in its own words)."""
  try:
    tree = ast.parse(pathlib.Path(file).read_text(), file)
  except (OSError, SyntaxError, ValueError):
    return False
  return any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body)


def config_filename(name: str = "config") -> str:
  """The file a `define_config` flag was read from (with its `:ARG`), for error messages."""
  return FLAGS[name].config_filename


def define_compilation_cache(help_string: str = "Persistent XLA compilation cache ('' disables).") -> None:
  flags.DEFINE_string("compilation_cache", "~/.cache/h3jax/xla", help_string)


def reject_args(argv) -> None:
  """absl passes positional arguments through; these commands take none."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")


@contextlib.contextmanager
def one_line_errors(*types, code: int = 2):
  """An exception of `types` ends the command with one `error: ...` line on stderr and exit `code`:
  bad input the library names precisely needs no traceback."""
  try:
    yield
  except types as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(code)


def quiet_logs(keep_explicit_verbosity: bool = False) -> None:
  """Library INFO logs off (Orbax logs every save and restore; progress bars and the commands' own lines
  say what happens). keep_explicit_verbosity: an explicit --verbosity wins."""
  if not (keep_explicit_verbosity and FLAGS["verbosity"].present):
    logging.set_verbosity(logging.WARNING)
