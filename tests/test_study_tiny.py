"""`python -m h3jax.study` end to end on configs/study_tiny.py (structure, not quality), bad configs, and
kill-and-resume during a training stage and during an evaluation stage."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMOLLM2_DIR

CONFIG = REPO / "configs" / "study_tiny.py"


@pytest.fixture(scope="module")
def judges_dir(quick_judges):
  """The study needs every judge to compute its axes: the run's quick judges (conftest), built once."""
  return quick_judges[0]


def _cmd(workdir, judges_dir, *extra):
  return [sys.executable, "-m", "h3jax.study", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.judges.dir={judges_dir}", "--config.judges.build_if_missing=False", *extra]


def _env(data_root):
  return dict(os.environ, JAX_PLATFORMS="cpu", H3JAX_DATA_ROOT=str(data_root), HF_HUB_OFFLINE="1",
              JAX_NUM_CPU_DEVICES="1")  # XLA_FLAGS (-O0, conftest) inherited


def _require_smollm2():
  if not (SMOLLM2_DIR / "config.json").exists():
    pytest.fail(f"{SMOLLM2_DIR} missing (its tokenizer is the tiny study's): run `make smollm2`")


def test_bad_config_is_one_error_line_before_any_work(tmp_path, data_root):
  _require_smollm2()
  w = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-m", "h3jax.study", f"--config={CONFIG}", f"--workdir={w}",
                         "--config.rows=('base','moe_magic')"], capture_output=True, text=True,
                        env=_env(data_root), cwd=REPO, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: unknown study rows")
  assert not w.exists()


def _cli_config(w, judges_dir):
  """The config `_cmd(w, judges_dir, ...)` gives the CLI, resolved against workdir w as main() does: the
  listing, publishing, re-scoring and restoring below call the library in this process (a CLI process
  would spend its few seconds importing), the study itself and the refusals run the CLI."""
  from h3jax.train.defaults import load_config_file
  sc = load_config_file(CONFIG)
  with sc.unlocked():
    sc.judges.dir, sc.judges.build_if_missing = str(judges_dir), False
  return _resolved(sc, w)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, data_root, judges_dir, monkeypatch):
  _require_smollm2()
  monkeypatch.setenv("H3JAX_DATA_ROOT", str(data_root))
  w = tmp_path / "study"
  proc = subprocess.run(_cmd(w, judges_dir, "--workers=0"), capture_output=True, text=True, env=_env(data_root),
                        cwd=REPO, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "0 failed" in proc.stdout
  res = json.loads((w / "analysis" / "results.json").read_text())
  from h3jax.study import plan
  from h3jax.train.defaults import load_config_file
  sc = load_config_file(CONFIG)
  assert set(res["models"]) == set(sc.rows) and not res["pending_rows"]
  assert [p["gamma1"] for p in res["gamma_sweep"]] == [1e-3, 1e-1]  # validation scores of the sweep
  for r, e in res["models"].items():  # every row on the same items
    assert e["metrics"]["honest/mc2"]["n"] == 3 and e["metrics"]["helpful/win_rate_text_davinci_003"]["n"] == 3, r
    assert set(e["study_axes"]) == {"helpful", "harmless", "honest", "3h"}, r
  assert {c["what"].split(" (")[0] for c in res["comparisons"]} >= {
      "H3Fusion vs the best individual expert", "H3Fusion vs the output ensemble", "H3Fusion vs the best merge",
      "best merge vs data-mixture SFT", "intended H3Fusion vs the reference code's defects",
      "Stage B training vs none"}
  assert set(res["expert_bar"]) == {"helpful", "harmless", "honest"}
  assert res["models"]["moe_gate_drift"]["router_usage"] and "router_moe_gate_drift.png" in res["plots"]
  for f in ("results.md", "radar_families.png", "tradeoff.png", "gamma_sweep.png", "training_curves.png"):
    assert (w / "analysis" / f).is_file(), f
  sel = json.loads((w / "select" / "merge_ties" / "DONE.json").read_text())["result"]
  assert sel["choice"] in ("g0", "g1") and len(sel["grid"]) == 2
  from h3jax.study import publish, rescore, runner
  scw = _cli_config(w, judges_dir)
  listing = runner.listing(scw, w)
  assert listing.strip().splitlines()[-1].startswith(f"{len(plan.build(_resolved(sc, w)))}/")
  assert "ready" not in listing and "waiting" not in listing
  out = tmp_path / "published"
  publish.publish(scw, w, out)
  assert (out / "results.json").is_file() and (out / "samples_moe_gate_drift.jsonl.gz").is_file()
  assert "stages" in json.loads((out / "recipes.json").read_text())
  rep = rescore.rescore(scw, out)
  assert rep["max_abs_diff"] <= 1e-9 and not any(v["not_rescored"] for v in rep["rows"].values())
  elsewhere = tmp_path / "data_elsewhere"  # the other machine keeps the same data at another path
  elsewhere.symlink_to(data_root, target_is_directory=True)
  monkeypatch.setenv("H3JAX_DATA_ROOT", str(elsewhere))
  _check_restore(tmp_path, w, out, judges_dir, elsewhere, sc)


def _check_restore(tmp_path, w, published, judges_dir, data_root, sc):
  """A fresh workdir restored from the published folder (another machine, its data at another path): every
  stage done, the experts' checkpoints equal the trained ones, the analysis and a re-publish reproduce the
  published results; a stage needing outputs that were not restored, another config, other judges are
  refused."""
  import numpy as np
  from h3jax import checkpoint
  from h3jax.model.params import flatten_dict
  from h3jax.study import publish, restore, runner
  assert sorted(p.name for p in (published / "experts").iterdir()) == ["harmless", "helpful", "honest"]
  w2 = tmp_path / "restored"
  env = _env(data_root)
  sc2 = _cli_config(w2, judges_dir)
  restore.restore(sc2, w2, published)
  lines = runner.listing(sc2, w2).strip().splitlines()[:-1]
  assert all(l.startswith("done") for l in lines if l.split()[1] != "analysis"), lines  # analysis is run below
  for a in ("helpful", "harmless", "honest"):
    (c1, p1), (c2, p2) = (checkpoint.load_params(d / "train" / f"expert_{a}" / "checkpoints") for d in (w, w2))
    assert c1 == c2
    f1, f2 = flatten_dict(p1), flatten_dict(p2)
    assert f1.keys() == f2.keys() and all(np.array_equal(f1[k], f2[k]) for k in f1), a
  subprocess.run(_cmd(w2, judges_dir, "--only=analysis"), check=True, capture_output=True, env=env, cwd=REPO,
                 timeout=600)
  res1 = json.loads((published / "results.json").read_text())
  res2 = json.loads((w2 / "analysis" / "results.json").read_text())
  assert res2["models"] == res1["models"] and res2["comparisons"] == res1["comparisons"]
  assert res2["gamma_sweep"] == res1["gamma_sweep"] and not res2["pending_rows"]
  assert res2["plots"] == res1["plots"] and "training_curves.png" in res2["plots"]
  out2 = tmp_path / "republished"
  publish.publish(sc2, w2, out2)
  assert json.loads((out2 / "timings.json").read_text()).keys() == json.loads(
      (published / "timings.json").read_text()).keys()
  for f in sorted(published.glob("samples_*.jsonl.gz")) + sorted(published.glob("experts/*/*.safetensors")):
    assert (out2 / f.relative_to(published)).read_bytes() == f.read_bytes(), f
  for f in sorted(published.glob("experts/*/adapter_config.json")):  # the tiny base lives in the workdir
    c1, c2 = (json.loads(x.read_text()) for x in (f, out2 / f.relative_to(published)))
    assert c1.pop("base_model_name_or_path").startswith(str(w)) and c2.pop("base_model_name_or_path")
    assert c1 == c2, f
  # the MoE row's model was not restored: redoing its evaluation is refused, naming the record to delete
  for d in [w2 / "score" / "moe_gate_drift"] + sorted((w2 / "gen" / "moe_gate_drift").iterdir()):
    (d / "DONE.json").unlink()
  proc = subprocess.run(_cmd(w2, judges_dir, "--only=score/moe_gate_drift"), capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and "train/moe_gate_drift/DONE.json" in proc.stderr.strip().splitlines()[-1]
  # refused before anything is written: another study config, other judges
  w3 = tmp_path / "w3"
  proc = subprocess.run(_cmd(w3, judges_dir, f"--restore={published}", "--config.stage_b_steps=3"),
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and "another study config" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
  assert not w3.exists()
  other = tmp_path / "other_judges"
  shutil.copytree(judges_dir, other)
  jf = sorted(other.glob("*.json"))[0]
  jf.write_text(jf.read_text() + " ")
  with sc.unlocked():
    sc.judges.dir = str(other)
  with pytest.raises(ValueError, match="differ from"):
    restore._check_judges(sc, published)
  shutil.rmtree(other)  # a folder of something else: refused by the checks, not failed on half-way
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds files but no judges"):
    restore._check_judges(sc, published)


def _resolved(sc, w):
  from h3jax.study import plan
  plan.resolve_base(sc, w)
  return sc


def _start(cmd, env):
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                          start_new_session=True)  # its own process group, killed whole


def _kill_when(proc, ready, timeout=900):
  """SIGKILL the run's whole process group (runner and stage processes) once ready() holds."""
  t0 = time.time()
  try:
    while not ready():
      assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
      assert time.time() - t0 < timeout, "the run never reached the state to kill it in"
      time.sleep(0.2)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _generations(cache: pathlib.Path) -> int:
  if not cache.is_file():
    return 0
  return sum('"kind": "generation"' in l for l in cache.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.optin  # ~2 min on 2 idle cores; the default run keeps the end-to-end study (CI's 15-minute budget)
def test_kill_during_training_and_evaluation_then_resume(tmp_path, data_root, judges_dir):
  """SIGKILL the whole run once inside Stage A training and once inside generation; the rerun finishes
  with the same results as an uninterrupted run."""
  _require_smollm2()
  env = _env(data_root)
  extra = ("--only=score/expert_helpful", "--config.expert_steps.helpful=10",
           "--config.eval.generation.max_new_tokens=24", "--config.eval.batch_size=2")
  ref = tmp_path / "ref"  # uninterrupted, in one process
  subprocess.run(_cmd(ref, judges_dir, *extra, "--workers=0"), check=True, env=env, cwd=REPO, timeout=900,
                 capture_output=True)
  w = tmp_path / "killed"
  ckpts = w / "train" / "expert_helpful" / "checkpoints"
  _kill_when(_start(_cmd(w, judges_dir, *extra), env),
             lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()))
  assert not (w / "train" / "expert_helpful" / "DONE.json").exists()  # killed inside the stage
  cache = w / "eval" / "expert_helpful" / "cache" / "expert_helpful.jsonl"
  _kill_when(_start(_cmd(w, judges_dir, *extra), env), lambda: _generations(cache) >= 1)
  assert not (w / "score" / "expert_helpful" / "DONE.json").exists()
  proc = subprocess.run(_cmd(w, judges_dir, *extra), capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:]
  a = json.loads((ref / "eval" / "expert_helpful" / "results.json").read_text())["models"]["expert_helpful"]
  b = json.loads((w / "eval" / "expert_helpful" / "results.json").read_text())["models"]["expert_helpful"]
  assert a["metrics"] == b["metrics"]
  sa = (ref / "eval" / "expert_helpful" / "samples_expert_helpful.jsonl").read_text()
  assert sa == (w / "eval" / "expert_helpful" / "samples_expert_helpful.jsonl").read_text()
