"""h3jax.progress.bar: the one progress helper."""

from h3jax import progress


def test_disabled_bar_is_the_iterable_itself():
  items = [1, 2, 3]
  assert progress.bar(items, desc="x", enabled=False) is items
  assert progress.bar(total=3, desc="x", enabled=False) is None


def test_enabled_bar_iterates_and_counts(capsys):
  assert list(progress.bar(range(3), desc="merge", unit="tensor")) == [0, 1, 2]
  manual = progress.bar(total=4, initial=1, desc="train")
  manual.update(3)
  assert manual.n == 4
  manual.close()
  assert "merge" in capsys.readouterr().err
