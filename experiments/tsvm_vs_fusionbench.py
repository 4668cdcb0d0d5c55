r"""h3jax TSV-M / RESM / Iso-CTS vs fusion-bench 0.2.33 on the quickstart's FFN-only LoRA experts.

  make quickstart   # (the three Stage-A experts in runs/quickstart are enough)
  make oracles      # .venv-fusionbench (fusion-bench 0.2.33, torch CPU)
  .venv/bin/python experiments/tsvm_vs_fusionbench.py --run runs/quickstart --out runs/tsvm_vs_fb

Per tensor, every state-dict key independently (both libraries treat keys independently, so this is
their whole-model result on those keys); each step is skipped when its output exists:
 1. the experts (LoRA folded in, float32, as experiments/merge_3h.py loads them) -> --out/experts;
 2. h3jax's Python API on bare arrays -> --out/h3jax/<variant>.safetensors: `tsv_m` (alpha=1, solver
    'auto'), `tsv_m_svd`, `tsv_m_numerical` (rank_cap='numerical'), `resm` (defaults), `iso_cts`;
 3. fusion-bench `TaskSingularVectorMerging(alpha=1, exclude_keys=[])` and `ISO_CTS_Merge(1.0, 0.8)`
    in .venv-fusionbench, one tensor at a time -> --out/fusion_bench/<algo>.safetensors;
 4. comparison: finiteness; equality with the base where every task vector is zero; on the moved
    tensors ||h - fb|| / ||fb - base|| and each side's error against a float64 re-computation of
    FusionBench's algorithms from the same float32 task vectors, and the numbers that explain it.
The tensors compared are those matching --tensors: by default every fifth layer's (FFN ones moved,
the rest with zero task vectors) and the final norm, about 5 CPU-min in all; '.' = all 272, ~5x that,
plus minutes per variant for the 49152 x 576 embedding, where fusion-bench's Iso-CTS would form a
9.7 GB projector.
Writes --out/report.md (the tables in docs/merging.md, "TSV-M vs fusion-bench on FFN-only LoRA
experts") and --out/report.json (every per-tensor number).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import time

import numpy as np
from tsvm_refs import LORA_RTOL, RANK_RTOL, group_of, reference_stats  # experiments/, beside this script

REPO = pathlib.Path(__file__).resolve().parents[1]
AXES = ("helpful", "harmless", "honest")
FUSIONBENCH_PY = REPO / ".venv-fusionbench" / "bin" / "python"
# name -> (h3jax method, hyper-parameters)
VARIANTS = {"tsv_m": ("tsv_m", dict(alpha=1.0)),
            "tsv_m_svd": ("tsv_m", dict(alpha=1.0, solver="svd")),
            "tsv_m_numerical": ("tsv_m", dict(alpha=1.0, rank_cap="numerical", rank_rtol=RANK_RTOL)),
            "tsv_m_cap1e-3": ("tsv_m", dict(alpha=1.0, rank_cap="numerical", rank_rtol=LORA_RTOL)),
            "resm": ("resm", dict()),
            "iso_cts": ("iso_cts", dict(scaling_factor=1.0, common_space_fraction=0.8))}
FB_ALGOS = ("fb_tsv_m", "fb_iso_cts")

# fusion-bench's own algorithm objects on a pool of one-tensor modules: their run() loops over keys
# with no cross-key state, so this is their whole-model result while holding one tensor per model.
FUSIONBENCH_SCRIPT = r"""
import json, sys, os, time, contextlib, io, logging
logging.disable(logging.WARNING)
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.method import TaskSingularVectorMerging
from fusion_bench.method.isotropic_merging import ISO_CTS_Merge
job = json.load(open(sys.argv[1]))
class Flat(torch.nn.Module):
  def __init__(self, sd):  # copies: run() loads the merge into the pretrained module in place,
    super().__init__()     # which would otherwise overwrite the base array the next algorithm reads
    for k, v in sd.items():
      self.register_parameter(k.replace(".", "__"), torch.nn.Parameter(torch.tensor(v)))
algos = {"fb_tsv_m": TaskSingularVectorMerging(alpha=1.0, exclude_keys=[]),
         "fb_iso_cts": ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8)}
base = safe_open(job["base"], "np"); models = [safe_open(f, "np") for f in job["models"]]
outs, times, errors = {n: {} for n in job["algos"]}, {n: 0.0 for n in job["algos"]}, {}
for i, k in enumerate(job["keys"]):
  b = {k: base.get_tensor(k)}; ms = [{k: m.get_tensor(k)} for m in models]
  for name in job["algos"]:
    pool = BaseModelPool({"_pretrained_": Flat(b), **{f"m{j}": Flat(m) for j, m in enumerate(ms)}})
    t0 = time.process_time()
    try:
      with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        merged = algos[name].run(pool)
      outs[name][k] = merged.state_dict()[k.replace(".", "__")].detach().numpy().copy()
    except Exception as e:  # recorded per tensor; the other tensors still run
      errors.setdefault(name, {})[k] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    times[name] += time.process_time() - t0
  if i % 20 == 0 or i == len(job["keys"]) - 1:
    print(f"fusion-bench: {i + 1}/{len(job['keys'])} tensors", file=sys.stderr, flush=True)
for name in job["algos"]:
  save_file(outs[name], os.path.join(job["out"], name + ".safetensors"))
print(json.dumps({"torch": torch.__version__, "cpu_s": times, "errors": errors}), flush=True)
os._exit(0)  # skips fusion-bench's Fabric finalizers, which raise at interpreter shutdown
"""


def log(msg):
  print(f"[tsvm_vs_fb] {msg}", flush=True)


class Tensors:
  """Lazy per-tensor reads of a HF folder or one .safetensors file."""

  def __init__(self, path):
    from safetensors import safe_open
    path = pathlib.Path(path)
    self.handles = {}
    for f in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
      h = safe_open(str(f), "np")
      self.handles.update({k: h for k in h.keys()})

  def keys(self):
    return sorted(self.handles)

  def __getitem__(self, k):
    return self.handles[k].get_tensor(k)

  def get(self, k):
    return self[k] if k in self.handles else None


# ----------------------------------------------------------------------------- the merges

def has_keys(path: pathlib.Path, keys: list, info=None, algo=None) -> bool:
  """Whether an earlier run's output holds every key (or its recorded fusion-bench error)."""
  if not path.exists():
    return False
  failed = json.loads(info.read_text())["errors"].get(algo, {}) if info and info.exists() else {}
  return set(keys) <= set(Tensors(path).keys()) | set(failed)


def export_experts(run_dir: pathlib.Path, base_dir: str, out: pathlib.Path) -> list:
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
    dirs.append(dest)
  return dirs


def h3jax_merges(base: Tensors, models: list, keys: list, out: pathlib.Path) -> dict:
  from safetensors.numpy import save_file
  from h3jax import merging
  (out / "h3jax").mkdir(parents=True, exist_ok=True)
  times = {}
  for name, (method, hp) in VARIANTS.items():
    dest = out / "h3jax" / f"{name}.safetensors"
    if has_keys(dest, keys):
      continue
    t0, res = time.process_time(), {}
    for k in keys:
      res[k] = np.asarray(merging.get_method(method)(base[k], [m[k] for m in models], **hp))
    times[name] = time.process_time() - t0
    save_file(res, str(dest))
    log(f"h3jax {name}: {len(keys)} tensors, {times[name]:.0f} CPU-s")
  return times


def fusion_bench_merges(base_dir, experts: list, keys: list, out: pathlib.Path) -> dict:
  fb_dir = out / "fusion_bench"
  fb_dir.mkdir(parents=True, exist_ok=True)
  algos = [a for a in FB_ALGOS if not has_keys(fb_dir / f"{a}.safetensors", keys, fb_dir / "info.json", a)]
  if not algos:
    return json.loads((fb_dir / "info.json").read_text()) if (fb_dir / "info.json").exists() else {}
  if not FUSIONBENCH_PY.exists():
    raise SystemExit(f"error: {FUSIONBENCH_PY} missing: run `make oracles` (scripts/setup_oracles.sh)")
  job = fb_dir / "job.json"
  job.write_text(json.dumps(dict(base=str(pathlib.Path(base_dir) / "model.safetensors"),
                                 models=[str(e / "model.safetensors") for e in experts],
                                 out=str(fb_dir), algos=algos, keys=keys)))
  # One torch thread: OpenMP workers spin at their barriers when the cores are busy elsewhere.
  r = subprocess.run([str(FUSIONBENCH_PY), "-c", FUSIONBENCH_SCRIPT, str(job)], stdout=subprocess.PIPE,
                     text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(REPO),
                                     "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
  if r.returncode:
    raise SystemExit("error: fusion-bench failed (its stderr is above)")
  new = json.loads(r.stdout.strip().splitlines()[-1])
  log(f"fusion-bench {algos}: {new['cpu_s']} CPU-s, errors: { {a: len(e) for a, e in new['errors'].items()} }")
  info = json.loads((fb_dir / "info.json").read_text()) if (fb_dir / "info.json").exists() else new
  for field in ("cpu_s", "errors"):  # an earlier run's other algorithm keeps its record
    info[field] = {**{a: v for a, v in info[field].items() if a not in algos}, **new[field]}
  (fb_dir / "info.json").write_text(json.dumps(info, indent=1) + "\n")
  return info


# ----------------------------------------------------------------------------- comparison

def rel(x, y, b) -> float:
  """||x - y|| / ||y - b|| in float64 (0 when x == y)."""
  d = np.linalg.norm(x.astype(np.float64) - y)
  return float(d / np.linalg.norm(y.astype(np.float64) - b)) if d > 0 else 0.0


def compare(base: Tensors, models: list, keys: list, out: pathlib.Path, fb_errors: dict) -> dict:
  ours = {n: Tensors(out / "h3jax" / f"{n}.safetensors") for n in VARIANTS}
  fb = {n: Tensors(out / "fusion_bench" / f"{n}.safetensors") for n in FB_ALGOS}
  rows = {}
  for k in keys:
    b, ms = base[k], [m[k] for m in models]
    outs = {n: t[k] for n, t in ours.items()}
    outs.update({n: t.get(k) for n, t in fb.items() if t.get(k) is not None})
    moved = any(np.any(m != b) for m in ms)
    row = dict(group=group_of(k), moved=moved,
               fb_failed={n: e[k] for n, e in fb_errors.items() if k in e},
               finite={n: bool(np.isfinite(x).all()) for n, x in outs.items()},
               equals_base={n: bool(np.array_equal(x, b)) for n, x in outs.items()},
               resm_equals_tsv_m=bool(np.array_equal(outs["resm"], outs["tsv_m"])))
    if moved:
      row["delta_over_base"] = {n: float(np.linalg.norm(x.astype(np.float64) - b) / np.linalg.norm(b))
                                for n, x in outs.items()}
      if "fb_tsv_m" in outs:
        row["vs_fb_tsv_m"] = {n: rel(outs[n], outs["fb_tsv_m"], b) for n in ("tsv_m", "tsv_m_svd")}
      if "fb_iso_cts" in outs:
        row["iso_cts_vs_fb"] = rel(outs["iso_cts"], outs["fb_iso_cts"], b)
      if b.ndim == 2:
        row["ref"] = reference_stats(b, ms, outs)
    rows[k] = row
  return rows


def _stat(vals) -> str:
  v = np.asarray([x for x in vals if x is not None], np.float64)
  return f"{np.median(v):.3g} / {np.max(v):.3g}" if v.size else "–"


def summarize(rows: dict) -> str:
  groups = sorted({r["group"] for r in rows.values()})
  L = [f"{len(rows)} tensors; every output finite: {all(all(r['finite'].values()) for r in rows.values())}; "
       f"resm == tsv_m bit for bit on {sum(r['resm_equals_tsv_m'] for r in rows.values())}",
       "", "| group | tensors | moved | zero-τ tensors equal to base: h3jax (all variants) / fb TSV-M / fb Iso-CTS "
       "| fb failed (TSV-M / Iso-CTS) |", "|---|---|---|---|---|"]
  for g in groups:
    rs = [r for r in rows.values() if r["group"] == g]
    z = [r for r in rs if not r["moved"]]
    h = sum(all(v for n, v in r["equals_base"].items() if not n.startswith("fb_")) for r in z)
    f = [sum(r["equals_base"].get(a, False) for r in z) for a in FB_ALGOS]
    e = [sum(a in r["fb_failed"] for r in rs) for a in FB_ALGOS]
    L.append(f"| {g} | {len(rs)} | {len(rs) - len(z)} | {h} / {f[0]} / {f[1]} of {len(z)} | {e[0]} / {e[1]} |")
  fails = sorted({v for r in rows.values() for v in r["fb_failed"].values()})
  L += [f"fusion-bench errors: {'; '.join(fails) if fails else 'none'}", ""]
  moved = [r for r in rows.values() if r["moved"] and "vs_fb_tsv_m" in r]
  L += ["Moved tensors, ‖h − fb‖ / ‖fb − base‖, median / max:", "",
        "| group | tsv_m (auto) | tsv_m_svd | iso_cts vs fb Iso-CTS |", "|---|---|---|---|"]
  for g in sorted({r["group"] for r in moved}):
    rs = [r for r in moved if r["group"] == g]
    L.append(f"| {g} | " + " | ".join(_stat([r["vs_fb_tsv_m"][n] for r in rs])
                                      for n in ("tsv_m", "tsv_m_svd"))
             + f" | {_stat([r.get('iso_cts_vs_fb') for r in rs])} |")
  ref_groups = sorted({r["group"] for r in rows.values() if "ref" in r})
  by_group = {g: [r["ref"] for r in rows.values() if r["group"] == g and "ref" in r] for g in ref_groups}
  if ref_groups:
    def table(title, names, get):
      return ["", title, "", "| | " + " | ".join(f"{g} ({len(by_group[g])})" for g in ref_groups) + " |",
              "|---" * (len(ref_groups) + 1) + "|"] + [
          f"| {n} | " + " | ".join(_stat([x for s in by_group[g] for x in np.atleast_1d(get(s, n))])
                                   for g in ref_groups) + " |" for n in names]
    first = by_group[ref_groups[0]][0]
    L += table("Against float64 re-computations, ‖x − ref‖ / ‖ref − base‖, median / max:",
               [n for n in first if " vs " in n], lambda s, n: s[n])
    L += table("signal_share: the part of each delta inside the span of the experts' LoRA directions "
               "(triples above 1e-3 s_1), median / max:", list(first["signal_share"]),
               lambda s, n: s["signal_share"][n])
    L += table("Task-vector spectra (every task; r = cliff_rank), median / max:",
               [n for n in first if n != "signal_share" and " vs " not in n], lambda s, n: s[n])
  d = [r["delta_over_base"] for r in moved]
  if d:
    L += ["", "‖x − base‖ / ‖base‖ on the moved tensors, median: "
          + ", ".join(f"{n} {np.median([x[n] for x in d if n in x]):.3g}" for n in d[0])]
  return "\n".join(L)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", default="runs/quickstart", help="quickstart workdir holding the experts")
  ap.add_argument("--base", default="artifacts/smollm2-135m-instruct")
  ap.add_argument("--out", default="runs/tsvm_vs_fb")
  ap.add_argument("--tensors", default=r"layers\.\d*[05]\.|^model\.norm\.",
                  help="regex of the tensor names compared ('.' = all)")
  args = ap.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  experts = export_experts(pathlib.Path(args.run), args.base, out)
  base, models = Tensors(args.base), [Tensors(e) for e in experts]
  keys = [k for k in base.keys() if re.search(args.tensors, k)]
  times = h3jax_merges(base, models, keys, out)
  fb_info = fusion_bench_merges(args.base, experts, keys, out)
  log("comparing ...")
  rows = compare(base, models, keys, out, fb_info.get("errors", {}))
  table = summarize(rows)
  print(table)
  (out / "report.md").write_text(table + "\n")
  (out / "report.json").write_text(json.dumps(dict(h3jax_cpu_s=times, fusion_bench=fb_info,
                                                   selection=args.tensors, tensors=rows), indent=1) + "\n")
  log(f"wrote {out / 'report.md'}, {out / 'report.json'}")


if __name__ == "__main__":
  main()
