"""Safe replacement of an output folder or file (merge, export, prepare, evaluation results).

  with output_dir(out, overwrite=..., inputs=[...]) as tmp:
    ... write everything into tmp ...
  # now `out` is the complete new folder, or (on any error) the old one, untouched

Rules, checked before anything is written:
  * `out` must not be an input, contain one, or lie inside one (replacing it
    would delete the inputs); `inputs` are folders or files read by the job.
  * replacing an existing folder needs `overwrite`, and the folder must look like
    an output (flat: model / config / tokenizer files only); a folder with
    sub-folders or foreign files (a project directory, a mistyped path) is refused.
  * the new folder is built in a sibling `.NAME.tmp-PID-XXXX`; stale ones of the
    same output left by killed runs (their PID is gone) are removed first.
Replacement: the old folder is renamed aside (`.NAME.old-PID-XXXX`), the new one
renamed in, then the old one deleted. A run killed between the two renames leaves
the old folder aside; the next run for the same output moves it back first.
Folders and files get the modes the umask gives (mkdtemp/mkstemp make them owner-only).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Iterable, Optional

# What an output folder may hold and still be replaced by --overwrite (HF model folders,
# merge / prepare / export side files). Anything else is someone's data.
OUTPUT_FILE_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.model", "merges.txt", "vocab.txt",
                        "README.md", "*.yml", "*.yaml", "*.data", "*.md", "*.png", "*.jsonl")


class UnsafeOutputError(ValueError):
  """The requested output location would destroy inputs or foreign data."""


def current_umask() -> int:
  """The process umask, read without changing it where /proc allows (os.umask is racy)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  old = os.umask(0o022)
  os.umask(old)
  return old


def apply_umask(path, *, is_dir: Optional[bool] = None) -> None:
  """Give `path` the mode a plain open()/mkdir() would have: 0o666 / 0o777 minus the umask."""
  path = pathlib.Path(path)
  is_dir = path.is_dir() if is_dir is None else is_dir
  os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def _fix_modes(root: pathlib.Path) -> None:
  apply_umask(root, is_dir=True)
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      apply_umask(pathlib.Path(dirpath) / d, is_dir=True)
    for f in filenames:
      p = pathlib.Path(dirpath) / f
      if not p.is_symlink():
        apply_umask(p, is_dir=False)


def _inside(a: pathlib.Path, b: pathlib.Path) -> bool:
  """a is b or lies inside b (both resolved)."""
  return a == b or b in a.parents


def check_not_overlapping(out, inputs: Iterable) -> None:
  """Refuses an output that is an input, contains one or lies inside one."""
  o = pathlib.Path(out).resolve()
  for i in inputs:
    if i is None or str(i) == "":
      continue
    p = pathlib.Path(i).resolve()
    if o == p:
      raise UnsafeOutputError(f"output {out} is the input {i}; choose another output folder")
    if _inside(p, o):
      raise UnsafeOutputError(f"output {out} contains the input {i}; replacing it would delete the input")
    if _inside(o, p):
      raise UnsafeOutputError(f"output {out} lies inside the input {i}; choose a folder outside it")


def check_replaceable(out, *, own_subdirs: Iterable[str] = (), own_patterns: Iterable[str] = ()) -> None:
  """Refuses to replace an existing folder that holds sub-folders or non-output files; a writer whose
  output has sub-folders or other file kinds names them (`own_subdirs`, `own_patterns`)."""
  out = pathlib.Path(out)
  if not out.is_dir() or out.is_symlink():
    if out.exists() or out.is_symlink():
      raise UnsafeOutputError(f"output {out} exists and is a file or a link, not a folder; remove it or "
                              f"choose another output")
    return
  patterns, subdirs = OUTPUT_FILE_PATTERNS + tuple(own_patterns), set(own_subdirs)
  foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                   if (p.name not in subdirs if p.is_dir() else not any(fnmatch.fnmatch(p.name, pat)
                                                                        for pat in patterns)))
  if foreign:
    shown = foreign[:5] + (["..."] if len(foreign) > 5 else [])
    raise UnsafeOutputError(f"refusing to replace {out}: it holds {shown}, which no model output "
                            f"contains; remove them or choose another output folder")


def _pid_of(name: str, prefix: str) -> Optional[int]:
  head = name[len(prefix):].split("-", 1)[0]
  return int(head) if head.isdigit() else None


def _alive(pid: Optional[int]) -> bool:
  if pid is None or pid == os.getpid():
    return pid is not None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def clean_stale(out) -> list:
  """Removes `.NAME.tmp-*` / `.NAME.old-*` folders of `out` whose writer is gone; moves an
  aside old folder back when a killed run left no `out`. Returns the removed paths."""
  out = pathlib.Path(out)
  parent, removed = out.parent, []
  if not parent.is_dir():
    return removed
  tmp_prefix, old_prefix = f".{out.name}.tmp-", f".{out.name}.old-"
  for p in sorted(parent.iterdir()):
    for prefix in (tmp_prefix, old_prefix):
      if p.name.startswith(prefix) and p.is_dir() and not _alive(_pid_of(p.name, prefix)):
        if prefix == old_prefix and not os.path.lexists(out):
          os.rename(p, out)  # killed between the two renames: the old output is still whole
        else:
          shutil.rmtree(p, ignore_errors=True)
          removed.append(p)
  return removed


@contextlib.contextmanager
def output_dir(out, *, overwrite: bool = False, inputs: Iterable = (), own_subdirs: Iterable[str] = (),
               own_patterns: Iterable[str] = ()):
  """Yields a fresh temp folder next to `out`; on success it replaces `out` (see module doc).

  `overwrite=False` refuses an existing non-empty `out` (FileExistsError); callers that want
  their own wording check first. `own_subdirs` / `own_patterns`: see check_replaceable.
  """
  out = pathlib.Path(out).absolute()
  check_not_overlapping(out, inputs)
  out.parent.mkdir(parents=True, exist_ok=True)
  clean_stale(out)
  if out.exists() or out.is_symlink():
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
      pass  # an empty folder is replaced without --overwrite
    elif not overwrite:
      raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    else:
      check_replaceable(out, own_subdirs=own_subdirs, own_patterns=own_patterns)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
  try:
    yield tmp
    _fix_modes(tmp)
    if os.path.lexists(out):
      old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
      os.rename(out, old)
      try:
        os.rename(tmp, out)
      except BaseException:
        os.rename(old, out)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_bytes(path, data: bytes) -> pathlib.Path:
  """Writes a file atomically (temp file + rename) with the umask's mode, not mkstemp's 0600: a reader
  sees no file (or the old one) or the whole new one."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    apply_umask(tmp, is_dir=False)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  return path


def write_text(path, text: str, encoding: str = "utf-8") -> pathlib.Path:
  """`write_bytes` of the encoded text."""
  return write_bytes(path, text.encode(encoding))
