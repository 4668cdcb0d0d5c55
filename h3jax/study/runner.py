"""Runs the study DAG: resumable stages, `--workers` parallel processes, progress and ETA.

Each stage runs in its own subprocess (`python -m h3jax.study ... --stage=NAME`), so a crash or a
kill takes down only that stage, and its outputs are complete or absent: a finished stage writes
`<workdir>/<stage>/DONE.json` (result, seconds, CPU seconds) last. A stage whose dependencies are
done is started when a worker is free; stages are taken in plan order (training first), and at most one
heavy stage (training, merging) runs at a time: two would compete for the same cores and memory.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import List, Optional

from h3jax import io_atomic
from h3jax.study import plan, stages as stage_lib


# Stages that use every core and several GB (training, merging): at most one at a time, next to
# generation / scoring stages (which decode on about one core).
HEAVY = ("train", "merge", "base")


def _log(msg: str) -> None:
  print(f"[study] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def done_path(workdir, name: str) -> pathlib.Path:
  return pathlib.Path(workdir) / name / "DONE.json"


def is_done(workdir, stage: plan.Stage) -> bool:
  """Done with the stage's current key (plan.done_record)."""
  return plan.done_record(workdir, stage) is not None


def _start(workdir, stage: plan.Stage) -> None:
  """Marks the stage folder with the key it is run under. A folder left by the stage under another key
  (a finished stage now stale, or one killed before its settings changed) is emptied first: training
  must not resume from checkpoints of other settings. Evaluation caches are keyed by their settings."""
  d = pathlib.Path(workdir) / stage.name
  marker = d / "KEY"
  old = marker.read_text().strip() if marker.is_file() else None
  if plan.is_stale(workdir, stage) or (old is not None and not plan.is_current(stage, old)):
    _log(f"{stage.name}: settings changed since it ran; redoing it from scratch")
    shutil.rmtree(d)
  d.mkdir(parents=True, exist_ok=True)
  io_atomic.write_text(marker, stage.key + "\n")


def rekey_old_records(workdir, stages) -> int:
  """Records (DONE.json, KEY) of stages done under an earlier key scheme (plan.with_keys) rewritten with
  today's key, so the workdir stays done when carried to a machine whose data root is elsewhere."""
  n = 0
  for s in stages:
    rec = plan.done_record(workdir, s)
    if rec is not None and rec.get("key") in s.old_keys:
      stage_lib._write_json(done_path(workdir, s.name), dict(rec, key=s.key))
      marker = pathlib.Path(workdir) / s.name / "KEY"
      if marker.is_file():
        io_atomic.write_text(marker, s.key + "\n")
      n += 1
  if n:
    _log(f"{n} stage record(s) of an earlier key scheme now carry today's keys")
  return n


def lock_workdir(workdir):
  """An exclusive lock on the workdir (held while the returned file is open): one runner per workdir, two
  would start the same stages."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lock = open(workdir / ".study.lock", "w")
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    lock.close()
    raise ValueError(f"another `h3jax.study` run is using {workdir} (it holds {workdir / '.study.lock'})") from None
  return lock


def check_restored_deps(workdir, stages: List[plan.Stage], by_name: dict) -> None:
  """Refuses stages whose dependency was restored from a published folder without its outputs (its
  model or merge folder): the stage would fail hours later on a missing folder."""
  from h3jax.study.restore import NOT_RESTORED
  for s in stages:
    for d in s.deps:
      rec = plan.done_record(workdir, by_name[d]) if d in by_name else None
      if rec is not None and rec.get("outputs") == NOT_RESTORED:
        raise ValueError(f"{s.name} needs the outputs of {d}, which was restored from {rec.get('restored_from')} "
                         f"without them; delete {pathlib.Path(workdir) / d / 'DONE.json'} to redo {d}")


def run_stage(sc, workdir, stage: plan.Stage) -> dict:
  """Runs one stage in this process and marks it done (DONE.json with the stage's key)."""
  import resource
  if sc.get("compile_cache", True):  # every stage process compiles the same decode / train / merge shapes
    from h3jax import compile_cache
    compile_cache.enable(pathlib.Path(workdir) / "jax_cache", min_compile_secs=0.5)
  t0 = time.time()
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  if stage.kind != "analysis":
    _start(workdir, stage)
  stage_lib.clear(workdir, stage)
  result = stage_lib.RUNNERS[stage.kind](sc, workdir, stage)
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
  rec = {"stage": stage.name, "kind": stage.kind, "key": stage.key, "result": result,
         "seconds": round(time.time() - t0, 1),
         "cpu_seconds": round(cpu, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
  path = done_path(workdir, stage.name)
  path.parent.mkdir(parents=True, exist_ok=True)
  stage_lib._write_json(path, rec)
  return rec


def listing(sc, workdir, patterns=()) -> str:
  """One line per stage: done / ready / waiting, with measured or estimated CPU time."""
  all_stages = plan.calibrated(workdir, plan.build(sc))
  stages = plan.select(all_stages, patterns)
  lines, left = [], 0.0
  names = {s.name for s in all_stages}
  by_name = {s.name: s for s in all_stages}
  for s in stages:
    rec = plan.done_record(workdir, s)
    if rec is not None:
      lines.append(f"done     {s.name:<40} {rec.get('cpu_seconds', 0) / 60:7.1f} CPU-min")
    else:
      ready = all(is_done(workdir, by_name[d]) for d in s.deps if d in names)
      state = "stale" if plan.is_stale(workdir, s) else "ready" if ready else "waiting"
      left += s.est_s
      lines.append(f"{state:<8} {s.name:<40} ~{s.est_s / 60:6.1f} CPU-min (est.)")
  n_done = sum(l.startswith("done") for l in lines)
  lines.append(f"{n_done}/{len(stages)} stages done; ~{left / 3600:.1f} CPU-hours left (estimate)")
  return "\n".join(lines)


def _stage_cmd(config_path: str, workdir, name: str, overrides: List[str]) -> List[str]:
  return [sys.executable, "-m", "h3jax.study", f"--config={config_path}", f"--workdir={workdir}",
          f"--stage={name}"] + list(overrides)


def run(sc, workdir, *, config_path: str, overrides=(), patterns=(), workers: int = 1,
        poll_s: float = 2.0, in_process: bool = False, log_dir: Optional[pathlib.Path] = None) -> dict:
  """Runs every pending stage matching `patterns` (and the pending stages they depend on).

  Returns {"done": [...], "failed": [...]}. A failed stage is reported and its dependants skipped;
  independent stages go on.
  """
  workdir = pathlib.Path(workdir)
  lock = lock_workdir(workdir)  # noqa: F841 (held until the run returns)
  planned = plan.build(sc)  # the config's estimates: calibrated against measurements, never twice
  all_stages = plan.calibrated(workdir, planned)
  by_name = {s.name: s for s in all_stages}
  rekey_old_records(workdir, all_stages)
  wanted = {s.name for s in plan.select(all_stages, patterns)}
  todo = set()

  def need(name):
    if name in todo or (is_done(workdir, by_name[name]) and by_name[name].kind != "analysis"):
      return
    todo.add(name)
    for d in by_name[name].deps:
      need(d)

  for n in wanted:
    need(n)
  order = [s for s in all_stages if s.name in todo and s.kind != "analysis"]
  check_restored_deps(workdir, order, by_name)
  analysis = [s for s in all_stages if s.kind == "analysis" and s.name in wanted]
  log_dir = log_dir or workdir / "logs"
  log_dir.mkdir(parents=True, exist_ok=True)
  running, failed, finished = {}, [], []
  est = {s.name: s.est_s for s in all_stages}
  t_start = time.time()
  _log(f"{len(order)} stages to run with {workers} worker(s); ~{sum(s.est_s for s in order) / 3600:.1f} "
       f"CPU-hours estimated")
  while order or running:
    for name, (proc, f) in list(running.items()):
      if proc.poll() is None:
        continue
      f.close()
      del running[name]
      if proc.returncode == 0 and is_done(workdir, by_name[name]):
        finished.append(name)
        est = {s.name: s.est_s for s in plan.calibrated(workdir, planned)}  # with this measurement
        rec = json.loads(done_path(workdir, name).read_text())
        _log(f"done {name} in {rec['seconds'] / 60:.1f} min ({rec['cpu_seconds'] / 60:.1f} CPU-min)")
      else:
        failed.append(name)
        _log(f"FAILED {name} (exit {proc.returncode}); log: {log_dir / (name.replace('/', '_') + '.log')}")
    blocked = {s.name for s in order if any(d in failed for d in s.deps)}
    for s in [s for s in order if s.name in blocked]:
      failed.append(s.name)
      _log(f"skipped {s.name}: a dependency failed")
    order = [s for s in order if s.name not in blocked]
    while len(running) < workers:
      heavy_running = any(by_name[n].kind in HEAVY for n in running)
      ready = [s for s in order if all(is_done(workdir, by_name[d]) for d in s.deps)
               and not (heavy_running and s.kind in HEAVY)]
      if not ready:
        break
      s = ready[0]
      order.remove(s)
      if in_process:
        _log(f"start {s.name} (~{s.est_s / 60:.1f} CPU-min)")
        try:
          run_stage(sc, workdir, s)
          finished.append(s.name)
        except Exception as e:  # report and go on with independent stages
          failed.append(s.name)
          _log(f"FAILED {s.name}: {type(e).__name__}: {e}")
        continue
      log = open(log_dir / (s.name.replace("/", "_") + ".log"), "a")
      env = dict(os.environ)
      proc = subprocess.Popen(_stage_cmd(config_path, workdir, s.name, overrides), stdout=log,
                              stderr=subprocess.STDOUT, env=env)
      running[s.name] = (proc, log)
      left = sum(est[x.name] for x in order) + sum(est[n] for n in running)
      _log(f"start {s.name} (~{est[s.name] / 60:.1f} CPU-min); {len(finished)} done, {len(order)} queued, "
           f"ETA ~{left / max(workers, 1) / 3600:.1f} h")
    if not running and order and not any(all(is_done(workdir, by_name[d]) for d in s.deps) for s in order):
      break  # nothing can start (dependencies outside the selection failed)
    if running:
      time.sleep(poll_s)
  for s in analysis:  # on whatever rows are scored by now
    _log(f"start {s.name}")
    try:
      rec = run_stage(sc, workdir, s)
      finished.append(s.name)
      _log(f"done {s.name}: rows {rec['result']['rows']}, pending {rec['result']['pending']}")
    except Exception as e:  # no scored rows yet, or a bug: report, keep the stages' results
      failed.append(s.name)
      _log(f"FAILED {s.name}: {type(e).__name__}: {e}")
  _log(f"finished {len(finished)} stage(s), {len(failed)} failed, in {(time.time() - t_start) / 60:.1f} min")
  return {"done": finished, "failed": failed}
