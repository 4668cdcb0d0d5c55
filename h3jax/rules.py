"""Path -> rule tables: one path form and one pattern dialect for every per-parameter policy.

Trainable leaves and learning-rate multipliers (`h3jax.train.optim`), sharding specs
(`h3jax.train.sharding`), LoRA targets (`h3jax.train.lora`) and merge rules (`h3jax.merging.rules`)
are all tables of `(pattern, value)` pairs matched against a path:

  path     the slash-joined key path of a params leaf ("layers/attn/q_proj/kernel"); merges of HF
           folders match the HF tensor name ("model.layers.0.mlp.up_proj.weight") the same way.
  pattern  a glob over the whole path (`fnmatch`; `*` also crosses "/": "layers/mlp/*"),
           `re:<regex>` (re.search: "re:/lora_[ab]$") or `sub:<text>` (a substring, mergekit's
           `filter`). A bare pattern with regex syntax (^ $ \\ ( ) + | { }) is an error, so a
           regex written without `re:` never silently matches nothing.

Formats that belong to other tools keep their own meaning and are translated at their border:
mergekit's `filter` is a substring (`sub:`), PEFT's `rank_pattern` a regex (`re:`).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Sequence, Tuple

Rules = Sequence[Tuple[str, Any]]
_REGEX_ONLY = set("^$\\()+|{}")


def path_str(keypath) -> str:
  """A key path -> 'a/b/c': jax key-path entries (dict keys, sequence indices, attributes) or the
  plain tuples of `h3jax.model.params.flatten_dict`."""
  parts = []
  for k in keypath:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def check_pattern(pattern: str) -> str:
  """The pattern, or ValueError when it cannot be meant as a glob."""
  if not isinstance(pattern, str) or not pattern:
    raise ValueError(f"a rule pattern must be a non-empty string, got {pattern!r}")
  if pattern.startswith(("re:", "sub:")):
    if pattern.startswith("re:"):
      try:
        re.compile(pattern[3:])
      except re.error as e:
        raise ValueError(f"rule pattern {pattern!r}: bad regular expression ({e})") from None
    return pattern
  bad = sorted(_REGEX_ONLY & set(pattern))
  if bad:
    raise ValueError(f"rule pattern {pattern!r} is a glob but uses regex syntax {''.join(bad)!r}: write "
                     f"'re:{pattern}' for a regular expression (or a glob such as 'layers/mlp/*')")
  return pattern


def matches(pattern: str, path: str) -> bool:
  if pattern.startswith("re:"):
    return re.search(pattern[3:], path) is not None
  if pattern.startswith("sub:"):
    return pattern[4:] in path
  return fnmatch.fnmatchcase(path, check_pattern(pattern))


def first_match(path: str, rules: Rules, default=None):
  """Value of the first `(pattern, value)` rule that matches `path`, else `default`."""
  for pattern, value in rules:
    if matches(pattern, path):
      return value
  return default


def check_rules(rules: Rules, what: str = "rules") -> tuple:
  """The rules as a tuple of pairs, each pattern checked (errors name the table)."""
  out = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"{what}[{i}] must be a (pattern, value) pair, got {rule!r}")
    try:
      out.append((check_pattern(rule[0]), rule[1]))
    except ValueError as e:
      raise ValueError(f"{what}[{i}]: {e}") from None
  return tuple(out)
