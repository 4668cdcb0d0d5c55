"""Output replacement (h3jax.io_atomic) and its users: merge driver, export, prepare, eval results.

Issue 11 item 2: `merge --out=DIR --overwrite` with the inputs inside DIR deleted them; the driver
deleted the old output before renaming the new one in; killed runs left `.tmp-*` folders behind;
outputs were drwx------ / -rw-------. Kill tests use real subprocesses and SIGKILL."""

from __future__ import annotations

import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

import merge_fixtures as mf
from h3jax import io_atomic
from h3jax.merging.streaming import driver

REPO = pathlib.Path(__file__).resolve().parents[1]


def _mode(p) -> int:
  return stat.S_IMODE(os.stat(p).st_mode)


def _snapshot(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
  root = tmp_path_factory.mktemp("atomic")
  base, models, _ = mf.llama_family(root / "fam", 2, tied=False, seed=7)
  return base, models


def _spec(base, models):
  return mf.spec("task_arithmetic", base, models, model_params=[dict(weight=0.5)] * len(models))


# --- (a) an output that is, holds or lies inside an input is refused -----------------------------


def test_merge_out_containing_the_inputs_is_refused_and_nothing_is_deleted(tmp_path):
  # The reported case: inputs inside DIR, --out=DIR --overwrite; the old driver exited 0 after
  # deleting both input models and an unrelated file.
  d = tmp_path / "DIR"
  base, models, _ = mf.llama_family(d, 2, tied=False, seed=3)
  (d / "notes.txt").write_text("mine")
  before = _snapshot(d)
  with pytest.raises(driver.MergeError, match="contains the input"):
    driver.run_merge(_spec(base, models), d, overwrite=True, progress=False)
  assert _snapshot(d) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR"]  # no temp folder either


@pytest.mark.parametrize("where", ["is", "inside"])
def test_merge_out_that_is_or_lies_inside_an_input_is_refused(fam, tmp_path, where):
  base, models = fam
  before = _snapshot(pathlib.Path(models[0]))
  out = pathlib.Path(models[0]) if where == "is" else pathlib.Path(models[0]) / "sub"
  with pytest.raises(driver.MergeError, match="is the input" if where == "is" else "lies inside the input"):
    driver.run_merge(_spec(base, models), out, overwrite=True, progress=False)
  assert _snapshot(pathlib.Path(models[0])) == before


def test_overwrite_refuses_a_folder_with_subfolders_or_foreign_files(fam, tmp_path):
  base, models = fam
  out = tmp_path / "out"
  (out / "project").mkdir(parents=True)
  with pytest.raises(driver.MergeError, match="refusing to replace"):
    driver.run_merge(_spec(base, models), out, overwrite=True, progress=False)
  (out / "project").rmdir()
  (out / "thesis.tex").write_text("x")
  with pytest.raises(driver.MergeError, match=r"thesis\.tex"):
    driver.run_merge(_spec(base, models), out, overwrite=True, progress=False)
  assert (out / "thesis.tex").read_text() == "x"


def test_export_refuses_an_output_holding_its_checkpoint_or_tokenizer(tmp_path):
  from h3jax.hf import export
  ckpt = tmp_path / "run" / "checkpoints"
  ckpt.mkdir(parents=True)
  with pytest.raises(io_atomic.UnsafeOutputError, match="contains the input"):
    export.export_checkpoint(ckpt, tmp_path / "run", overwrite=True)
  tok = tmp_path / "tok"
  tok.mkdir()
  with pytest.raises(io_atomic.UnsafeOutputError, match="is the input"):
    export.export_checkpoint(ckpt, tok, tokenizer_source=tok, overwrite=True)
  assert ckpt.is_dir() and tok.is_dir()


def test_check_not_overlapping_cases(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  (a / "x").mkdir(parents=True)
  b.mkdir()
  io_atomic.check_not_overlapping(tmp_path / "c", [a, b, None])
  io_atomic.check_not_overlapping(tmp_path / "a2", [a])  # a prefix of the name is not containment
  for out, msg in [(a, "is the input"), (tmp_path, "contains the input"), (a / "x" / "y", "lies inside")]:
    with pytest.raises(io_atomic.UnsafeOutputError, match=msg):
      io_atomic.check_not_overlapping(out, [a])
  link = tmp_path / "link"
  link.symlink_to(a)
  with pytest.raises(io_atomic.UnsafeOutputError, match="is the input"):
    io_atomic.check_not_overlapping(link, [a])


# --- (b) old aside -> new in -> old deleted; a failure keeps the old output -----------------------


def test_failed_replacement_keeps_the_old_output(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text("old")
  with pytest.raises(RuntimeError):
    with io_atomic.output_dir(out, overwrite=True) as tmp:
      (tmp / "config.json").write_text("new")
      raise RuntimeError("merge failed half way")
  assert (out / "config.json").read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  with io_atomic.output_dir(out, overwrite=True) as tmp:
    (tmp / "config.json").write_text("new")
  assert (out / "config.json").read_text() == "new"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  with pytest.raises(FileExistsError):
    with io_atomic.output_dir(out) as tmp:
      pass


_KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, pathlib, sys, time
    from h3jax import io_atomic
    out = pathlib.Path(sys.argv[1])
    real = os.rename
    def rename(src, dst):  # pause for the SIGKILL after the old output was moved aside
      real(src, dst)
      if ".old-" in str(dst):
        (out.parent / "aside").write_text("")
        time.sleep(60)
    os.rename = rename
    with io_atomic.output_dir(out, overwrite=True) as tmp:
      (tmp / "config.json").write_text("new")
""")


def test_sigkill_between_the_renames_loses_nothing(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text("old")
  p = subprocess.Popen([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(out)], cwd=REPO)
  try:
    deadline = time.time() + 120
    while not (tmp_path / "aside").exists():
      assert p.poll() is None and time.time() < deadline, "child ended before the pause"
      time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
  finally:
    p.wait()
  assert not out.exists()  # killed between the renames: the old output is aside, whole
  leftovers = sorted(q for q in tmp_path.iterdir() if q.name.startswith(".out."))
  assert [q.name.startswith(".out.old-") for q in leftovers] == [True, False]
  # The next run for this output restores it first, so --overwrite is needed again ...
  with pytest.raises(FileExistsError):
    with io_atomic.output_dir(out):
      pass
  assert (out / "config.json").read_text() == "old"
  assert sorted(q.name for q in tmp_path.iterdir()) == ["aside", "out"]  # the killed run's temp is gone


# --- (c) stale temp folders of killed runs are removed -----------------------------------------


def test_stale_temp_folders_of_dead_runs_are_removed_live_ones_kept(tmp_path):
  out = tmp_path / "m"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True).stdout.strip()
  stale = [tmp_path / f".m.tmp-{dead}-abcd1234", tmp_path / ".m.tmp-x9y8z7w6"]  # new and old names
  live = tmp_path / f".m.tmp-{os.getppid()}-live0000"  # a concurrent writer (alive)
  other = tmp_path / f".mm.tmp-{dead}-abcd1234"  # another output's
  for d in stale + [live, other]:
    (d / "sub").mkdir(parents=True)
  with io_atomic.output_dir(out) as tmp:
    (tmp / "config.json").write_text("{}")
  assert not any(d.exists() for d in stale) and live.exists() and other.exists()


def test_sigkilled_merge_cli_leaves_old_output_and_next_run_cleans_up(fam, tmp_path):
  base, models = fam
  cfg = tmp_path / "ta.yaml"
  cfg.write_text(yaml.safe_dump(dict(merge_method="task_arithmetic", base_model=base, dtype="float32",
                                     models=[dict(model=m, parameters=dict(weight=0.5)) for m in models])))
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text('{"old": true}')
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  cmd = [sys.executable, "-m", "h3jax.merge", f"--config={cfg}", f"--out={out}", "--overwrite", "--noprogress"]
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not list(tmp_path.glob(".out.tmp-*/*.data")):  # the writer has started streaming tensors
      assert p.poll() is None and time.time() < deadline, "merge ended before it could be killed"
      time.sleep(0.002)
    os.kill(p.pid, signal.SIGKILL)
  finally:
    p.wait()
  assert (out / "config.json").read_text() == '{"old": true}'  # the old output is untouched
  assert list(tmp_path.glob(".out.tmp-*"))  # the killed run's temp folder
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert not list(tmp_path.glob(".out.*"))  # stale temp removed, no aside folder left
  merged = mf.read_tensors(out)
  b, m0, m1 = (mf.read_tensors(x) for x in (base, *models))
  k = "model.layers.1.mlp.down_proj.weight"
  np.testing.assert_allclose(merged[k], b[k] + 0.5 * (m0[k] - b[k]) + 0.5 * (m1[k] - b[k]), rtol=1e-5,
                             atol=1e-6 * np.abs(b[k]).max())


# --- (d) modes follow the umask ------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umask_modes(fam, tmp_path, umask):
  base, models = fam
  old = os.umask(umask)
  try:
    driver.run_merge(_spec(base, models), tmp_path / "merged", progress=False)
    io_atomic.write_text(tmp_path / "results.json", "{}")
  finally:
    os.umask(old)
  assert _mode(tmp_path / "merged") == 0o777 & ~umask
  files = list((tmp_path / "merged").iterdir())
  assert {f.name for f in files} >= {"config.json", "model.safetensors"}
  for f in files + [tmp_path / "results.json"]:
    assert _mode(f) == 0o666 & ~umask, (f, oct(_mode(f)))


def test_a_writer_names_its_own_subfolders_and_file_kinds(tmp_path):
  """A published study folder holds judges/ and *.gz: replaceable by its writer, not by a model writer."""
  out = tmp_path / "published"
  (out / "judges").mkdir(parents=True)
  (out / "samples_base.jsonl.gz").write_bytes(b"x")
  with pytest.raises(io_atomic.UnsafeOutputError, match="judges/"):
    io_atomic.check_replaceable(out)
  with pytest.raises(io_atomic.UnsafeOutputError, match=r"samples_base\.jsonl\.gz"):
    io_atomic.check_replaceable(out, own_subdirs=("judges",))
  with io_atomic.output_dir(out, overwrite=True, own_subdirs=("judges",), own_patterns=("*.gz",)) as tmp:
    (tmp / "results.json").write_text("{}")
  assert sorted(p.name for p in out.iterdir()) == ["results.json"]
  (out / "data").mkdir()  # someone's folder inside: refused even with the writer's names
  with pytest.raises(io_atomic.UnsafeOutputError, match="data/"):
    with io_atomic.output_dir(out, overwrite=True, own_subdirs=("judges",), own_patterns=("*.gz",)):
      pass
  assert (out / "data").is_dir() and (out / "results.json").is_file()
