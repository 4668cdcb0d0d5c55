"""The one progress helper: a tqdm bar on stderr for every long loop (merge tensors, training steps,
HF load / export leaves, MC log-prob batches), or nothing at all when disabled."""

from __future__ import annotations

from typing import Iterable, Optional


def bar(iterable: Optional[Iterable] = None, *, desc: str, unit: str = "it", total: Optional[int] = None,
        initial: int = 0, enabled: bool = True, **tqdm_kwargs):
  """tqdm over `iterable`, or (iterable None) a bar of `total` steps advanced with `.update(n)`.

  Disabled: the iterable itself, unchanged (None for a manual bar), so callers loop the same way.
  tqdm is imported only when a bar is shown.
  """
  if not enabled:
    return iterable
  from tqdm.auto import tqdm
  return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, **tqdm_kwargs)
