"""Merge speed and peak memory: h3jax vs mergekit-yaml (TIES) and vs fusion-bench (TSV-M).

  .venv/bin/python benchmarks/merge_speed.py [--smollm2 artifacts/smollm2-135m-instruct]
      [--work artifacts/merge_bench] [--methods ties,tsv_m] [--repeats 1] [--h3jax_devices 2]

Inputs: SmolLM2-135M-Instruct and three deterministic "fine-tuned" variants of it
(base + seeded sparse Gaussian deltas on 5% of every tensor, written once to
--work), or real fine-tunes of it given with --experts. Every tool runs in its own subprocess on the same files in this
run; the wall time is the whole process (imports, reading, merging, writing) and the
peak RSS is the child's ru_maxrss. TIES: density 0.2, weights 1, normalize,
lambda 1 (the same mergekit YAML for both). TSV-M: alpha 1 over all 2-D tensors
(fusion-bench's defaults). Outputs are cross-checked in the same run (max
relative error for TIES, relative Frobenius error of the merged delta for
TSV-M). With TIES it also times a no-merge floor in the same run, alternating with h3jax
round by round (the ratio per round and best / best are printed): a process that
starts jax, reads every input with h3jax's reader, sums them and writes the sums,
so the table shows the largest speed-up any merge could reach on this machine.
Prints a table and writes benchmarks/results/merge_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

from timing import cpu_model

REPO = pathlib.Path(__file__).resolve().parents[1]
H3JAX_PY = REPO / ".venv" / "bin" / "python"
MERGEKIT_YAML = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
FUSIONBENCH_PY = REPO / ".venv-fusionbench" / "bin" / "python"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")

# Runs argv[1:] as a child and prints {"wall_s", "peak_rss_mb", "cpu_s", "rc"} as its last line
# (cpu_s: user + system seconds of all its threads; unlike wall time, not inflated by other jobs).
_WRAP = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "rc": r.returncode, "stderr_tail": r.stderr[-2000:] if r.returncode else ""}))
"""

_FUSIONBENCH_TSVM = r"""
import sys, torch, transformers, contextlib, io, logging
logging.disable(logging.WARNING)
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.method import TaskSingularVectorMerging
base, out, *experts = sys.argv[1:]
load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
pool = BaseModelPool({"_pretrained_": load(base), **{f"m{i}": load(p) for i, p in enumerate(experts)}})
with contextlib.redirect_stdout(io.StringIO()):
  merged = TaskSingularVectorMerging(alpha=1.0, exclude_keys=[]).run(pool)
merged.save_pretrained(out)
"""

# The no-merge floor: start Python and jax, read every input tensor with h3jax's reader, add them,
# write the sums with h3jax's writer. No method can run faster than this in-process I/O.
_IO_FLOOR = r"""
import sys, numpy as np, jax
jax.devices()
from h3jax.hf.st_io import SafetensorsReader, SafetensorsWriter
out, *ins = sys.argv[1:]
readers = [SafetensorsReader(p) for p in ins]
w = SafetensorsWriter(out, max_shard_size="5GB")
for k in readers[0].keys():
  acc = readers[0].get(k).astype(np.float32)
  for r in readers[1:]:
    acc += r.get(k)
  w.add(k, acc)
w.close()
"""


SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def make_synthetic_base(meta_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  """Seeded random weights with SmolLM2-135M's exact tensor names/shapes (for machines the
  540 MB checkpoint cannot be copied to); config/tokenizer files come from `meta_dir`."""
  sys.path.insert(0, str(REPO))
  from h3jax.hf.st_io import SafetensorsWriter
  if (out / ".done").exists():
    return out
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  c = SMOLLM2_135M
  V, D, F, H, K, Dh = (c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                       c["num_key_value_heads"], c["head_dim"])
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                   p + "self_attn.q_proj.weight": (H * Dh, D), p + "self_attn.k_proj.weight": (K * Dh, D),
                   p + "self_attn.v_proj.weight": (K * Dh, D), p + "self_attn.o_proj.weight": (D, H * Dh),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F)})
  w = SafetensorsWriter(out, max_shard_size="5GB")
  for j, (name, shape) in enumerate(sorted(shapes.items())):
    rng = np.random.default_rng([99, j])
    x = rng.uniform(0.5, 1.5, shape) if len(shape) == 1 else 0.02 * rng.standard_normal(shape)
    w.add(name, x.astype(np.float32))
  w.close()
  for f in SIDE_FILES:
    if (meta_dir / f).exists():
      shutil.copy2(meta_dir / f, out / f)
  (out / ".done").write_text("ok\n")
  return out


def make_variants(base_dir: pathlib.Path, work: pathlib.Path, n: int = 3, frac: float = 0.05) -> list:
  """Deterministic fine-tune stand-ins: theta + N(0, (0.05 std(theta))^2) on `frac` of entries."""
  sys.path.insert(0, str(REPO))
  from h3jax.hf.st_io import SafetensorsReader, SafetensorsWriter
  dirs = []
  for i in range(n):
    d = work / f"variant{i}"
    dirs.append(d)
    if (d / ".done").exists():
      continue
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    with SafetensorsReader(base_dir) as r:
      w = SafetensorsWriter(d, max_shard_size="5GB")
      for j, name in enumerate(sorted(r.keys())):
        x = r.get(name).astype(np.float32)
        rng = np.random.default_rng([i, j])
        mask = rng.random(x.shape) < frac
        delta = rng.standard_normal(x.shape).astype(np.float32) * (0.05 * float(x.std()) + 1e-4)
        w.add(name, np.where(mask, x + delta, x).astype(np.float32))
      w.close()
    for f in SIDE_FILES:
      if (base_dir / f).exists():
        shutil.copy2(base_dir / f, d / f)
    (d / ".done").write_text("ok\n")
  return dirs


def timed(cmd, env=None) -> dict:
  r = subprocess.run([sys.executable, "-c", _WRAP, *map(str, cmd)], capture_output=True, text=True,
                     env=env)
  res = json.loads(r.stdout.strip().splitlines()[-1])
  if res["rc"]:
    raise RuntimeError(f"{cmd[0]} failed (rc {res['rc']}):\n{res['stderr_tail']}")
  return res


def read(path) -> dict:
  from safetensors.numpy import load_file
  out = {}
  for f in sorted(pathlib.Path(path).glob("*.safetensors")):
    out.update({k: v.astype(np.float32) for k, v in load_file(str(f)).items()})
  return out


def ties_error(a_dir, b_dir) -> float:
  a, b = read(a_dir), read(b_dir)
  return max(float(np.max(np.abs(a[k] - b[k]) / (1 + np.abs(b[k])))) for k in a)


def tsvm_error(a_dir, b_dir, base_dir):
  """(max relative Frobenius error of the merged delta over tensors, the worst tensor)."""
  a, b, base = read(a_dir), read(b_dir), read(base_dir)
  errs = {}
  for k in a:
    da, db = a[k] - base[k], b[k] - base[k]
    errs[k] = float(np.linalg.norm(da - db) / max(np.linalg.norm(db), 1e-12))
  worst = max(errs, key=errs.get)
  return errs[worst], worst


def tsvm_f64_errors(key, base_dir, variant_dirs, outputs: dict) -> dict:
  """Relative Frobenius error of each output's merged delta for `key` against TSV-M in float64.

  Decides which of two disagreeing fp32 results is closer to exact arithmetic: near
  the rank-k cut, near-equal singular values and a small sigma_min of the concatenated
  V (the polar factor scales errors by ~1/sigma_min) make fp32 results differ.
  """
  from h3jax.hf.st_io import SafetensorsReader
  get = lambda d: SafetensorsReader(str(d)).get(key).astype(np.float64)
  base = get(base_dir)
  deltas = [get(v) - base for v in variant_dirs]
  k = min(base.shape) // len(deltas)
  us, ss, vs, gaps = [], [], [], []
  for d in deltas:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k].T)
    gaps.append(float((s[k - 1] - s[k]) / s[0]) if k < len(s) else 1.0)

  def polar(x):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt, float(s.min())

  (pu, smin_u), (pv, smin_v) = polar(np.concatenate(us, 1)), polar(np.concatenate(vs, 1))
  ref = (pu * np.concatenate(ss)) @ pv.T
  out = {"key": key, "min_relative_gap_at_rank_k": min(gaps), "sigma_min_U_cat": smin_u,
         "sigma_min_V_cat": smin_v}
  for name, d in outputs.items():
    out[f"{name}_rel_err_vs_f64"] = float(np.linalg.norm(get(d) - base - ref) / np.linalg.norm(ref))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smollm2", default=str(REPO / "artifacts" / "smollm2-135m-instruct"))
  p.add_argument("--work", default=str(REPO / "artifacts" / "merge_bench"))
  p.add_argument("--methods", default="ties,tsv_m")
  p.add_argument("--repeats", type=int, default=2,
                 help="warm rounds per method; TIES: one cold h3jax run (empty compilation cache), then "
                      "this many rounds of h3jax and the no-merge floor, alternating; best reported")
  p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "merge_speed.json"))
  p.add_argument("--experts", default="",
                 help="comma-separated HF folders of real fine-tunes of --smollm2 to merge instead of the "
                      "synthetic variants (e.g. the study's LoRA experts, whose task vectors are zero outside "
                      "the FFN)")
  p.add_argument("--synthetic_from", default=None,
                 help="folder with SmolLM2's config/tokenizer files: use seeded random weights of its shapes")
  p.add_argument("--h3jax_python", default=str(H3JAX_PY))
  p.add_argument("--mergekit_yaml", default=str(MERGEKIT_YAML))
  p.add_argument("--fusionbench_python", default=str(FUSIONBENCH_PY))
  p.add_argument("--mergekit_cuda", action="store_true", help="also time mergekit-yaml --cuda")
  p.add_argument("--h3jax_devices", type=int, default=1,
                 help="h3jax.merge --devices (tensors round-robin over that many CPU devices)")
  args = p.parse_args()
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  if args.synthetic_from:
    base = make_synthetic_base(pathlib.Path(args.synthetic_from), work / "synthetic_base")
  else:
    base = pathlib.Path(args.smollm2)
  h3jax_py, mk_yaml, fb_py = pathlib.Path(args.h3jax_python), pathlib.Path(args.mergekit_yaml), \
      pathlib.Path(args.fusionbench_python)
  t0 = time.perf_counter()
  variants = ([pathlib.Path(e) for e in args.experts.split(",")] if args.experts
              else make_variants(base, work))
  print(f"variants ready in {time.perf_counter() - t0:.1f}s: {[str(v) for v in variants]}", flush=True)
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS=os.environ.get(
      "JAX_PLATFORMS", "cpu"))
  rows, results = [], {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
                       "h3jax_devices": args.h3jax_devices,
                       "model": str(base), "variants": [str(v) for v in variants],
                       "real_experts": bool(args.experts), "runs": {}}

  def run_rounds(jobs, repeats=1):
    """`repeats` rounds, each running every (tag, cmd, out_dir) of `jobs` once, in order: interleaved, so a
    machine whose speed drifts (these VMs' does, by up to 40% within minutes) slows every job alike.
    Returns each job's best run (by wall time); all runs are recorded."""
    runs = {tag: [] for tag, _, _ in jobs}
    for _ in range(repeats):
      for tag, cmd, out_dir in jobs:
        shutil.rmtree(out_dir, ignore_errors=True)
        res = timed(cmd, env)
        runs[tag].append(res)
        print(f"  {tag}: {res['wall_s']:.1f}s (CPU {res['cpu_s']:.1f}s), peak RSS {res['peak_rss_mb']:.0f} MB",
              flush=True)
    for tag, all_runs in runs.items():
      results["runs"].setdefault(tag, {}).update(best=min(all_runs, key=lambda r: r["wall_s"]), all=all_runs)
    return [results["runs"][tag]["best"] for tag, _, _ in jobs]

  def run(tag, cmd, out_dir, repeats=1):
    """(best, first) of `repeats` runs (h3jax: run 1 is cold, with an empty compilation cache; later runs
    reuse the compiled kernels)."""
    best, = run_rounds([(tag, cmd, out_dir)], repeats)
    return best, results["runs"][tag]["all"][0]

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save(rows):  # after every method, so a cut-short run still leaves its numbers
    results["synthetic_weights"] = bool(args.synthetic_from)
    results["jax_platforms"] = env["JAX_PLATFORMS"]
    results["table"] = rows
    out.write_text(json.dumps(results, indent=2) + "\n")

  methods = args.methods.split(",")
  if "ties" in methods:
    cfg = work / "ties.yaml"
    cfg.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "models:\n" + "".join(f"  - model: {v}\n    parameters: {{weight: 1.0, density: 0.2}}\n" for v in variants)
        + "parameters: {normalize: true, lambda: 1.0}\ndtype: float32\nout_dtype: float32\n")
    shutil.rmtree(work / "xla_cache", ignore_errors=True)
    h3jax_job = ("h3jax_ties", [h3jax_py, "-m", "h3jax.merge", f"--config={cfg}", f"--out={work / 'h3jax_ties'}",
                                f"--devices={args.h3jax_devices}", "--noprogress",
                                f"--compilation_cache={work / 'xla_cache'}"], work / "h3jax_ties")
    cold, = run_rounds([h3jax_job])  # compiles the kernels into the cache
    results["runs"]["h3jax_ties"] = {"cold": cold}
    h, fl = run_rounds([h3jax_job, ("io_floor", [h3jax_py, "-c", _IO_FLOOR, work / "io_floor", base, *variants],
                                    work / "io_floor")], args.repeats)
    per_round = [a["wall_s"] / b["wall_s"] for a, b in zip(results["runs"]["h3jax_ties"]["all"],
                                                            results["runs"]["io_floor"]["all"])]
    row = {"method": "TIES d=0.2", "h3jax_s": h["wall_s"], "h3jax_cold_s": cold["wall_s"],
           "h3jax_cpu_s": h["cpu_s"], "h3jax_rss_mb": h["peak_rss_mb"], "io_floor_s": fl["wall_s"],
           "floor_ratio_best": h["wall_s"] / fl["wall_s"], "floor_ratio_per_round": per_round,
           "floor_ratio_median": float(np.median(per_round))}
    if mk_yaml.exists():
      m, _ = run("mergekit_ties", [mk_yaml, cfg, work / "mergekit_ties"], work / "mergekit_ties")
      if args.mergekit_cuda:
        mc, _ = run("mergekit_ties_cuda", [mk_yaml, cfg, work / "mergekit_ties_cuda", "--cuda"],
                    work / "mergekit_ties_cuda")
        row.update(peer_cuda_s=mc["wall_s"], peer_cuda_rss_mb=mc["peak_rss_mb"])
      err = ties_error(work / "h3jax_ties", work / "mergekit_ties")
      row.update(peer="mergekit-yaml 0.1.5", peer_s=m["wall_s"], peer_cpu_s=m["cpu_s"], peer_rss_mb=m["peak_rss_mb"],
                 speedup=m["wall_s"] / h["wall_s"], max_err=err,
                 floor_speedup=m["wall_s"] / fl["wall_s"])  # the most any method could reach here
      results["ties_max_rel_err_vs_mergekit"] = err
    rows.append(row)
    save(rows)
  if "tsv_m" in methods:
    cfg = work / "tsvm_cfg.py"
    cfg.write_text(
        "def get_config():\n"
        f"  return dict(merge_method='tsv_m', base_model={str(base)!r},\n"
        f"              models=[dict(model=m) for m in {[str(v) for v in variants]!r}],\n"
        "              parameters=dict(alpha=1.0), dtype='float32')\n")
    h, cold = run("h3jax_tsv_m", [h3jax_py, "-m", "h3jax.merge", f"--config={cfg}",
                                  f"--out={work / 'h3jax_tsvm'}", f"--devices={args.h3jax_devices}", "--noprogress",
                                  f"--compilation_cache={work / 'xla_cache'}"], work / "h3jax_tsvm", args.repeats)
    row = {"method": "TSV-M a=1", "h3jax_s": h["wall_s"], "h3jax_cold_s": cold["wall_s"],
           "h3jax_cpu_s": h["cpu_s"], "h3jax_rss_mb": h["peak_rss_mb"]}
    if fb_py.exists():
      f, _ = run("fusion_bench_tsv_m", [fb_py, "-c", _FUSIONBENCH_TSVM, base, work / "fb_tsvm", *variants],
              work / "fb_tsvm")
      err, worst = tsvm_error(work / "h3jax_tsvm", work / "fb_tsvm", base)
      results["tsv_m_worst_tensor"] = worst
      row.update(peer="fusion-bench 0.2.33", peer_s=f["wall_s"], peer_cpu_s=f["cpu_s"], peer_rss_mb=f["peak_rss_mb"],
                 speedup=f["wall_s"] / h["wall_s"], max_err=err)
      results["tsv_m_max_rel_fro_err_vs_fusion_bench"] = err
      results["tsv_m_worst_tensor_vs_f64"] = tsvm_f64_errors(
          worst, base, variants, {"h3jax": work / "h3jax_tsvm", "fusion_bench": work / "fb_tsvm"})
    rows.append(row)
  save(rows)
  print(f"\n{'method':<12}{'h3jax s':>9}{'(cold)':>8}{'RSS MB':>8}  {'peer':<22}{'peer s':>8}{'RSS MB':>8}"
        f"{'speedup':>9}{'max err':>10}")
  for r in rows:
    print(f"{r['method']:<12}{r['h3jax_s']:>9.1f}{r['h3jax_cold_s']:>8.1f}{r['h3jax_rss_mb']:>8.0f}  "
          f"{r.get('peer', '-'):<22}"
          f"{r.get('peer_s', float('nan')):>8.1f}{r.get('peer_rss_mb', float('nan')):>8.0f}"
          f"{r.get('speedup', float('nan')):>8.1f}x{r.get('max_err', float('nan')):>10.2g}")
    if "io_floor_s" in r:
      print(f"{'':<12}no-merge floor (start jax, read inputs, sum, write): {r['io_floor_s']:.1f} s, "
            f"{r.get('floor_speedup', float('nan')):.1f}x the peer: the most any merge could reach here")
      print(f"{'':<12}h3jax / floor: {r['floor_ratio_best']:.2f}x best / best, per round (interleaved) "
            f"{', '.join(f'{x:.2f}' for x in r['floor_ratio_per_round'])}: median {r['floor_ratio_median']:.2f}x")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
