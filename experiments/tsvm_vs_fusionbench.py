r"""h3jax TSV-M / RESM / Iso-CTS vs fusion-bench 0.2.33 on the quickstart's FFN-only LoRA experts.

  make quickstart   # or just: python -m h3jax.pipeline --config=configs/smollm2_quickstart.py \
                    #            --workdir=runs/quickstart  (the three Stage-A experts are enough)
  make oracles      # .venv-fusionbench (fusion-bench 0.2.33, torch CPU)
  .venv/bin/python experiments/tsvm_vs_fusionbench.py --run runs/quickstart --out runs/tsvm_vs_fb

Steps (each skipped when its output already exists, so a re-run only redoes the comparison):
 1. the three experts (LoRA folded in, float32, as experiments/merge_3h.py loads them) are written
    as HF folders under --out/experts;
 2. h3jax merges them with its streaming driver (`h3jax.merge.merge_from_config`, .py configs)
    into whole HF folders under --out/h3jax (evaluable): `tsv_m` (alpha=1, default solver 'auto'),
    `resm_sparsity_sv` (rank_mode='sparsity', outlier_mode='sv'), `iso_cts` (defaults); --methods
    adds `resm`, `tsv_m_svd`, `tsv_m_numerical` as whole models. Otherwise those three (`resm`
    defaults, `tsv_m` solver='svd', `tsv_m` rank_cap='numerical') are computed per tensor with the
    Python API on every tensor the experts moved and on layer 0's (spot check);
 3. fusion-bench 0.2.33 runs `TaskSingularVectorMerging(alpha=1.0, exclude_keys=[])` and
    `ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8)` on the same float32 tensors in
    .venv-fusionbench (one subprocess, one tensor at a time: both treat keys independently);
 4. per tensor: finiteness of every output; ||h - fb|| / ||fb - base|| and ||h - fb|| / ||fb||;
    each side's error ||x - ref|| / ||ref - base|| against a float64 numpy TSV-M of the same
    float32 task vectors (FusionBench's algorithm: thin SVDs, top floor(r/T) triples per task,
    polar factors of the stacks from SVDs; `--ref_polar` picks the full polar factor, as torch
    computes it, or h3jax's partial isometry); the singular spectrum of each task vector
    (sigma_9 / sigma_1 for r = 8 LoRA); what each side returns on tensors whose task vectors are
    all zero (attention, embeddings, norms).
Prints one table per tensor group (median / max over the group) and writes --out/report.json
with every per-tensor number. Expected (docs/merging.md, "TSV-M vs fusion-bench on FFN-only LoRA
experts"): every output finite; every zero-task-vector tensor exactly the base on both sides;
on the FFN tensors the h3jax and fusion-bench deltas differ by about as much as each differs
from the float64 reference, because the triples beyond the LoRA rank are float32 rounding noise
whose directions no float32 SVD resolves.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
AXES = ("helpful", "harmless", "honest")
FUSIONBENCH_PY = REPO / ".venv-fusionbench" / "bin" / "python"

# name -> (h3jax method, parameters of its .py merge config): whole models through the driver.
H3JAX_RUNS = {
    "tsv_m": ("tsv_m", dict(alpha=1.0)),
    "resm": ("resm", dict()),
    "resm_sparsity_sv": ("resm", dict(rank_mode="sparsity", outlier_mode="sv")),
    "iso_cts": ("iso_cts", dict(scaling_factor=1.0, common_space_fraction=0.8)),
    "tsv_m_numerical": ("tsv_m", dict(alpha=1.0, rank_cap="numerical")),
    "tsv_m_svd": ("tsv_m", dict(alpha=1.0, solver="svd")),
}
DEFAULT_RUNS = ("tsv_m", "resm_sparsity_sv", "iso_cts")
# TSV-M variants computed per tensor (Python API, bare arrays) on the tensors with non-zero task
# vectors only, unless the driver wrote them as whole models (--methods).
TENSOR_VARIANTS = {"resm": ("resm", dict()),
                   "tsv_m_svd": ("tsv_m", dict(alpha=1.0, solver="svd")),
                   "tsv_m_numerical": ("tsv_m", dict(alpha=1.0, rank_cap="numerical"))}

# fusion-bench's own algorithm objects, run on one tensor at a time: TaskSingularVectorMerging.run
# and ISO_CTS_Merge.run treat every state-dict key independently (a loop over keys with no
# cross-key state), so a pool of one-tensor modules gives exactly their whole-model result while
# holding one tensor of each model (the whole-model pool takes ~5 GB; this host is shared).
FUSIONBENCH_SCRIPT = r"""
import json, sys, os, time, contextlib, io, logging
logging.disable(logging.WARNING)
import numpy as np, torch
from safetensors import safe_open
from safetensors.numpy import save_file
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.method import TaskSingularVectorMerging
from fusion_bench.method.isotropic_merging import ISO_CTS_Merge
job = json.load(open(sys.argv[1]))
class Flat(torch.nn.Module):
  def __init__(self, sd):
    super().__init__()
    for k, v in sd.items():
      self.register_parameter(k.replace(".", "__"), torch.nn.Parameter(torch.from_numpy(v)))
algos = {"fb_tsv_m": TaskSingularVectorMerging(alpha=1.0, exclude_keys=[]),
         "fb_iso_cts": ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8)}
algos = {n: algos[n] for n in job["algos"]}
base = safe_open(job["base"], "np"); models = [safe_open(f, "np") for f in job["models"]]
keys = sorted(base.keys())
outs = {n: {} for n in algos}
times = {n: 0.0 for n in algos}
errors = {}
for i, k in enumerate(keys):
  b = {k: base.get_tensor(k)}; ms = [{k: m.get_tensor(k)} for m in models]
  for name, algo in algos.items():
    if name == "fb_iso_cts" and b[k].ndim == 2 and b[k].shape[0] ** 2 * 4 > job["max_projector_bytes"]:
      continue  # its w - U_c @ U_c.T @ w forms an M x M float32 projector (embedding: 9.7 GB)
    pool = BaseModelPool({"_pretrained_": Flat(b), **{f"m{j}": Flat(m) for j, m in enumerate(ms)}})
    t0 = time.perf_counter()
    try:
      with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        merged = algo.run(pool)
    except Exception as e:  # recorded per tensor; the other tensors still run
      errors.setdefault(name, {})[k] = f"{type(e).__name__}: {e}"
      print(f"fusion-bench {name} {k}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      continue
    finally:
      times[name] += time.perf_counter() - t0
    outs[name][k] = merged.state_dict()[k.replace(".", "__")].detach().numpy().copy()
  if i % 20 == 0 or i == len(keys) - 1:
    print(f"fusion-bench: {i + 1}/{len(keys)} tensors", file=sys.stderr, flush=True)
for name in algos:
  save_file(outs[name], os.path.join(job["out"], name + ".safetensors"))
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "times": times,
                  "errors": errors}), flush=True)
os._exit(0)  # skips fusion-bench's Fabric finalizers, which raise at interpreter shutdown
"""


def log(msg):
  print(f"[tsvm_vs_fb] {msg}", flush=True)


# ----------------------------------------------------------------------------- inputs and merges

def export_experts(run_dir: pathlib.Path, base_dir: str, out: pathlib.Path) -> list:
  """The three experts as float32 HF folders (LoRA folded in as experiments/merge_3h.py does)."""
  import h3jax
  from h3jax import checkpoint
  from h3jax.fusion import merge_lora
  dirs = []
  for axis in AXES:
    dest = out / "experts" / axis
    if not (dest / "config.json").exists():
      cfg, params = checkpoint.load_params(run_dir / axis / "checkpoints")
      h3jax.save_pretrained(merge_lora(params, cfg.lora_scale), cfg.replace(lora_scale=1.0), dest,
                            overwrite=True, tokenizer_source=base_dir, dtype="float32")
      log(f"expert {axis} -> {dest}")
    dirs.append(str(dest))
  return dirs


def h3jax_merges(base_dir: str, experts: list, out: pathlib.Path, names) -> dict:
  from h3jax.merge import merge_from_config
  times = {}
  for name in names:
    dest = out / "h3jax" / name
    if (dest / "config.json").exists():
      continue
    method, params = H3JAX_RUNS[name]
    cfg = out / "configs" / f"{name}.py"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "  c = ml_collections.ConfigDict()\n"
        f"  c.merge_method = {method!r}\n"
        f"  c.base_model = {base_dir!r}\n"
        f"  c.models = [dict(model=m) for m in {experts!r}]\n"
        f"  c.parameters = {params!r}\n"
        "  return c\n")
    t0 = time.perf_counter()
    merge_from_config(str(cfg), str(dest), overwrite=True, progress=False)
    times[name] = time.perf_counter() - t0
    log(f"h3jax {name}: {times[name]:.1f}s -> {dest}")
  return times


def fusion_bench_merges(base_dir: str, experts: list, out: pathlib.Path) -> dict:
  fb_dir = out / "fusion_bench"
  fb_dir.mkdir(parents=True, exist_ok=True)
  algos = [a for a in ("fb_tsv_m", "fb_iso_cts") if not (fb_dir / f"{a}.safetensors").exists()]
  if not algos:
    return {}
  if not FUSIONBENCH_PY.exists():
    raise SystemExit(f"error: {FUSIONBENCH_PY} missing: run `make oracles` (scripts/setup_oracles.sh)")
  job = fb_dir / "job.json"
  job.write_text(json.dumps(dict(base=str(pathlib.Path(base_dir) / "model.safetensors"),
                                 models=[str(pathlib.Path(e) / "model.safetensors") for e in experts],
                                 out=str(fb_dir), algos=algos, max_projector_bytes=2 ** 30)))
  t0 = time.perf_counter()
  # One torch thread: OpenMP workers spin at their barriers when the cores are busy elsewhere.
  r = subprocess.run([str(FUSIONBENCH_PY), "-c", FUSIONBENCH_SCRIPT, str(job)], stdout=subprocess.PIPE,
                     text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(REPO),
                                     "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
  if r.returncode:
    raise SystemExit("error: fusion-bench failed (its stderr is above)")
  info = json.loads(r.stdout.strip().splitlines()[-1])
  log(f"fusion-bench {algos}: {time.perf_counter() - t0:.1f}s (torch {info['torch']}, "
      f"{info['threads']} threads, {info['times']})")
  (fb_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
  return info


# ----------------------------------------------------------------------------- float64 reference

def _polar64(x, mode: str):
  """Polar factor in float64. 'full': U V^T of the thin SVD (torch's U_u @ Vh_u, FusionBench);
  'partial': only the singular values above 1e-5 of the largest (h3jax's blocks.polar)."""
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  if not s.size or s[0] == 0:
    return np.zeros_like(x)
  if mode == "partial":
    u = u * (s > 1e-5 * s[0])
  return u @ vt


def task_svds(base, models):
  """float64 thin SVDs of each task vector (exact differences of the float32 inputs)."""
  base64 = np.asarray(base, np.float64)
  return [np.linalg.svd(np.asarray(m, np.float64) - base64, full_matrices=False) for m in models]


def tsv_m_f64(base, svds, alpha=1.0, polar="full", rank_rtol=None):
  """float64 TSV-M (FusionBench's algorithm) from the task vectors' SVDs (`task_svds`);
  rank_rtol: h3jax's rank_cap='numerical' (triples below rank_rtol * s_max of their task dropped)."""
  base64 = np.asarray(base, np.float64)
  if not any(s[0] > 0 for _, s, _ in svds):
    return base64
  k = min(base.shape) // len(svds)
  us, ss, vs = [], [], []
  for u, s, vt in svds:
    keep = (s[:k] > 0) if rank_rtol is None else (s[:k] > rank_rtol * s[0])
    us.append(u[:, :k] * keep), ss.append(s[:k] * keep), vs.append(vt[:k].T * keep)
  u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
  return base64 + alpha * (_polar64(u, polar) * s) @ _polar64(v, polar).T


# ----------------------------------------------------------------------------- comparison

def group_of(name: str) -> str:
  if "mlp." in name:
    return "ffn (" + re.search(r"mlp\.(\w+)_proj", name).group(1) + ")"
  if "self_attn" in name:
    return "attention"
  if "embed" in name:
    return "embedding"
  if "norm" in name:
    return "norms (1-D)"
  return "other"


def _fro(x):
  return float(np.linalg.norm(np.asarray(x, np.float64).ravel()))


class Tensors:
  """Lazy per-tensor reads of a HF folder or a .safetensors file."""

  def __init__(self, path):
    from safetensors import safe_open
    path = pathlib.Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    self.handles = {}
    for f in files:
      h = safe_open(str(f), "np")
      for k in h.keys():
        self.handles[k] = h

  def keys(self):
    return sorted(self.handles)

  def __getitem__(self, k):
    return self.handles[k].get_tensor(k)


def _vs(x, y, b):
  """||x - y|| relative to y's delta from the base and to y; None where y is missing."""
  if y is None:
    return None
  d, yd = _fro(x.astype(np.float64) - y), _fro(y.astype(np.float64) - b)
  return dict(rel_delta=d / yd if yd > 0 else (0.0 if d == 0 else float("inf")), rel_weight=d / _fro(y))


def compare(base_dir, experts, out: pathlib.Path, names, ref_polar: str, max_ffn=None) -> dict:
  from h3jax import merging
  base = Tensors(base_dir)
  models = [Tensors(e) for e in experts]
  ours = {n: Tensors(out / "h3jax" / n) for n in names}
  fb = {n: Tensors(out / "fusion_bench" / f"{n}.safetensors") for n in ("fb_tsv_m", "fb_iso_cts")}
  info_file = out / "fusion_bench" / "info.json"
  fb_errors = json.loads(info_file.read_text()).get("errors", {}) if info_file.exists() else {}
  rows = {}
  n_ffn = 0
  for k in base.keys():
    b = base[k]
    ms = [m[k] for m in models]
    zero = [not np.any(m != b) for m in ms]
    row = dict(group=group_of(k), shape=list(b.shape), zero_tasks=[i for i, z in enumerate(zero) if z])
    outs = {n: t[k] for n, t in ours.items()}
    outs.update({n: t[k] for n, t in fb.items() if k in t.handles})
    for n in fb:
      if n not in outs:
        row.setdefault("fb_missing", {})[n] = fb_errors.get(n, {}).get(
            k, "not run: its w - U_c @ U_c.T @ w forms an M x M projector" if n == "fb_iso_cts" else "missing")
    ffn_ref = b.ndim == 2 and not all(zero) and (max_ffn is None or n_ffn < max_ffn)
    if ffn_ref or ".layers.0." in k:  # the per-tensor variants on every moved tensor, spot checks elsewhere
      for n, (method, hp) in TENSOR_VARIANTS.items():
        if n not in outs:
          outs[n] = np.asarray(merging.get_method(method)(b, ms, **hp))
      row["resm_equals_tsv_m"] = bool(np.array_equal(outs["resm"], outs["tsv_m"]))
    row["finite"] = {n: bool(np.isfinite(x).all()) for n, x in outs.items()}
    row["max_abs_minus_base"] = {n: float(np.max(np.abs(x.astype(np.float64) - b))) for n, x in outs.items()}
    row["equals_base"] = {n: bool(np.array_equal(x, b)) for n, x in outs.items()}
    row["fro_base"] = _fro(b)
    row["fro_minus_base"] = {n: _fro(x.astype(np.float64) - b) for n, x in outs.items()}
    row["fro_minus_base"].update({f"expert_{a}": _fro(m.astype(np.float64) - b) for a, m in zip(AXES, ms)})
    f = outs.get("fb_tsv_m")
    if f is not None:
      row["vs_fb_tsv_m"] = {n: _vs(x, f, b) for n, x in outs.items()
                            if n.startswith("tsv_m") or n.startswith("resm")}
    if "iso_cts" in outs and "fb_iso_cts" in outs:
      row["iso_cts_vs_fb_iso_cts"] = _vs(outs["iso_cts"], outs["fb_iso_cts"], b)
    if ffn_ref:
      n_ffn += 1
      svds = task_svds(b, ms)
      spectra = [s for _, s, _ in svds]
      ref = tsv_m_f64(b, svds, polar=ref_polar)
      ref_other = tsv_m_f64(b, svds, polar="partial" if ref_polar == "full" else "full")
      ref_num = tsv_m_f64(b, svds, polar=ref_polar, rank_rtol=1e-5)
      rd = _fro(ref - b)
      err = {n: _fro(outs[n].astype(np.float64) - ref) / rd
             for n in ("fb_tsv_m", "tsv_m", "tsv_m_svd", "resm") if n in outs}
      err["tsv_m_numerical (vs capped ref)"] = _fro(outs["tsv_m_numerical"].astype(np.float64) - ref_num) \
          / _fro(ref_num - b)
      err["ref polar full vs partial"] = _fro(ref_other - ref) / rd
      err["ref capped vs uncapped"] = _fro(ref_num - ref) / rd
      row["vs_f64_ref"] = err
      kk = min(b.shape) // len(ms)
      row["spectrum"] = dict(
          s1=[float(s[0]) for s in spectra],
          s9_over_s1=[float(s[8] / s[0]) for s in spectra],
          sk_over_s1=[float(s[kk - 1] / s[0]) for s in spectra],
          numerical_rank_1e5=[int(np.sum(s > 1e-5 * s[0])) for s in spectra],
          tau_over_base=[_fro(m.astype(np.float64) - b) / _fro(b) for m in ms])
    rows[k] = row
  return rows


def summarize(rows: dict) -> str:
  groups = sorted({r["group"] for r in rows.values()})
  lines = []
  allfinite = all(all(r["finite"].values()) for r in rows.values())
  lines.append(f"{len(rows)} tensors; every output finite: {allfinite}")
  lines.append("\n| group | tensors | zero task vectors | outputs equal to base (h3jax / fb) |")
  lines.append("|---|---|---|---|")
  for g in groups:
    rs = [r for r in rows.values() if r["group"] == g]
    nz = sum(len(r["zero_tasks"]) == 3 for r in rs)
    eq_h = sum(all(v for n, v in r["equals_base"].items() if not n.startswith("fb_")) for r in rs)
    eq_f = sum(all(v for n, v in r["equals_base"].items() if n.startswith("fb_")) for r in rs)
    lines.append(f"| {g} | {len(rs)} | all three on {nz} | {eq_h} / {eq_f} |")

  def stat(vals):
    v = np.asarray(vals, np.float64)
    return f"{np.median(v):.3g} / {np.max(v):.3g}" if v.size else "–"

  missing = {}
  for k, r in rows.items():
    for n, why in r.get("fb_missing", {}).items():
      missing.setdefault(n, []).append(f"{k} ({why})")
  for n, ks in missing.items():
    lines.append(f"\nfusion-bench {n}: no output for {len(ks)} tensors: " + "; ".join(ks[:5])
                 + (" ..." if len(ks) > 5 else ""))
  base_norm = np.sqrt(sum(r["fro_base"] ** 2 for r in rows.values()))
  lines.append("\nwhole model: ‖x − base‖ / ‖base‖ (over the tensors every output has)")
  common = set.intersection(*(set(r["fro_minus_base"]) for r in rows.values()))
  for n in [n for n in next(iter(rows.values()))["fro_minus_base"] if n in common]:
    d = np.sqrt(sum(r["fro_minus_base"][n] ** 2 for r in rows.values()))
    lines.append(f"  {n}: {d / base_norm:.3g}")
  eq = [r["resm_equals_tsv_m"] for r in rows.values() if "resm_equals_tsv_m" in r]
  lines.append(f"\nresm (defaults, Python API) bit-equal to tsv_m (driver) on {sum(eq)} of {len(eq)} tensors checked")
  ffn = [r for r in rows.values() if "vs_fb_tsv_m" in r and len(r["zero_tasks"]) < 3]
  lines.append("\nFFN tensors (non-zero task vectors), median / max over tensors:")
  lines.append("\n| h3jax run | ‖h − fb‖ / ‖fb − base‖ | ‖h − fb‖ / ‖fb‖ |")
  lines.append("|---|---|---|")
  for n in ffn[0]["vs_fb_tsv_m"] if ffn else ():
    lines.append(f"| {n} vs fb TSV-M | {stat([r['vs_fb_tsv_m'][n]['rel_delta'] for r in ffn])} | "
                 f"{stat([r['vs_fb_tsv_m'][n]['rel_weight'] for r in ffn])} |")
  iso = [r for r in ffn if isinstance(r.get("iso_cts_vs_fb_iso_cts"), dict)]
  if iso:
    lines.append(f"| iso_cts vs fb Iso-CTS | {stat([r['iso_cts_vs_fb_iso_cts']['rel_delta'] for r in iso])} | "
                 f"{stat([r['iso_cts_vs_fb_iso_cts']['rel_weight'] for r in iso])} |")
  ref = [r for r in ffn if "vs_f64_ref" in r]
  if ref:
    lines.append(f"\nvs the float64 TSV-M ({len(ref)} tensors), ‖x − ref‖ / ‖ref − base‖, median / max:")
    lines.append("\n| x | error |")
    lines.append("|---|---|")
    for n in ref[0]["vs_f64_ref"]:
      lines.append(f"| {n} | {stat([r['vs_f64_ref'][n] for r in ref])} |")
    sp = [r["spectrum"] for r in ref]
    lines.append("\ntask-vector spectra (all tasks, all tensors), median / max:")
    lines.append(f"  sigma_9 / sigma_1: {stat([x for s in sp for x in s['s9_over_s1']])}")
    lines.append(f"  sigma_k / sigma_1 (k = r/3): {stat([x for s in sp for x in s['sk_over_s1']])}")
    lines.append(f"  numerical rank (s > 1e-5 s_1): {stat([x for s in sp for x in s['numerical_rank_1e5']])}")
    lines.append(f"  ‖tau‖ / ‖base‖: {stat([x for s in sp for x in s['tau_over_base']])}")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", default="runs/quickstart", help="quickstart workdir holding the experts")
  ap.add_argument("--base", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--out", default="runs/tsvm_vs_fb")
  ap.add_argument("--methods", default=",".join(DEFAULT_RUNS),
                  help=f"whole-model h3jax driver runs, of {tuple(H3JAX_RUNS)} (tsv_m is required)")
  ap.add_argument("--ref_polar", choices=("full", "partial"), default="full",
                  help="polar factor of the float64 reference: full (FusionBench) or partial isometry (h3jax)")
  ap.add_argument("--max_ref_tensors", type=int, default=None, help="float64 references for at most N tensors")
  args = ap.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = tuple(args.methods.split(","))
  experts = export_experts(pathlib.Path(args.run), args.base, out)
  times = h3jax_merges(args.base, experts, out, names)
  fb_info = fusion_bench_merges(args.base, experts, out)
  log("comparing ...")
  rows = compare(args.base, experts, out, names, args.ref_polar, args.max_ref_tensors)
  table = summarize(rows)
  print(table)
  (out / "report.md").write_text(table + "\n")
  (out / "report.json").write_text(json.dumps(dict(h3jax_times=times, fusion_bench=fb_info,
                                                   ref_polar=args.ref_polar, tensors=rows), indent=1) + "\n")
  log(f"wrote {out / 'report.json'}, {out / 'report.md'}")


if __name__ == "__main__":
  main()
