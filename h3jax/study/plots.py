"""Study plots: radar per family, helpful-vs-harmless trade-off, router usage, γ sweep, training curves."""

from __future__ import annotations

import json
import math
import pathlib
from typing import List

import numpy as np

from h3jax.evaluation.report import _plt, plot_router_usage
from h3jax.study.defaults import AXES, MERGE_ROWS

FAMILIES = {
    "experts": ("base", "expert_helpful", "expert_harmless", "expert_honest"),
    "baselines": ("base", "mixture_sft", "ensemble_logits"),
    "merges": ("base",) + MERGE_ROWS,
    "h3fusion": ("base", "moe_untrained", "moe_lm", "moe_gate", "moe_gate_drift", "moe_gate_drift_top1",
                 "moe_reference"),
}


def _axes(results, row):
  ax = results["models"][row].get("study_axes", {})
  return [ax.get(a) for a in AXES]


def plot_radars(results: dict, path) -> None:
  """One radar of the three study axes per family of rows."""
  plt = _plt()
  angles = np.linspace(0, 2 * np.pi, len(AXES), endpoint=False).tolist()
  fig, axs = plt.subplots(1, len(FAMILIES), figsize=(5 * len(FAMILIES), 5), subplot_kw=dict(polar=True))
  for ax, (fam, rows) in zip(axs, FAMILIES.items()):
    for r in rows:
      if r not in results["models"]:
        continue
      vals = [0.0 if v is None or not math.isfinite(v) else 100 * v for v in _axes(results, r)]
      ax.plot(angles + angles[:1], vals + vals[:1], label=r)
      ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.05)
    ax.set_xticks(angles)
    ax.set_xticklabels(AXES)
    ax.set_ylim(0, 100)
    ax.set_title(fam)
    ax.legend(loc="lower left", bbox_to_anchor=(-0.15, -0.35), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def plot_tradeoff(results: dict, path) -> None:
  """Helpfulness vs harmlessness of every row, with the 3H mean in the label."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 6))
  for r, e in results["models"].items():
    ax_ = e.get("study_axes", {})
    if "helpful" not in ax_ or "harmless" not in ax_:
      continue
    ax.scatter(100 * ax_["helpful"], 100 * ax_["harmless"], s=30)
    ax.annotate(r, (100 * ax_["helpful"], 100 * ax_["harmless"]), fontsize=7, xytext=(3, 3),
                textcoords="offset points")
  ax.set_xlabel("helpful: win rate vs text_davinci_003 (%)")
  ax.set_ylabel("harmless: 1 − pooled harmful compliance (%)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_gamma_sweep(sc, results: dict, path) -> bool:
  pts = results.get("gamma_sweep") or []
  if len(pts) < 2:
    return False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  gs = [p["gamma1"] for p in pts]
  for a in AXES:
    se = [p.get("stderr", {}).get(a, {}) for p in pts]
    n = sorted({s["n"] for s in se if s})
    ax.errorbar(gs, [100 * p["axes"][a] if p["axes"].get(a) is not None else np.nan for p in pts],
                yerr=[100 * s["se"] if s else np.nan for s in se], fmt="o-", capsize=3,
                label=f"{a} (n = {'/'.join(map(str, n))})" if n else a)
  ax.set_xscale("log")
  ax.set_xlabel("γ of the helpful expert (γ1); others at %g" % sc.gamma)
  ax.set_ylabel("axis score on the validation items (%, ± 1 SE)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def plot_training_curves(workdir: pathlib.Path, path) -> bool:
  runs = sorted(p for p in (workdir / "train").glob("*/metrics.jsonl"))
  if not runs:
    return False
  plt = _plt()
  fig, axs = plt.subplots(1, 2, figsize=(13, 4.5))
  for p in runs:
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip().startswith("{")]
    rows = [r for r in rows if "train/lm_loss" in r]
    if not rows:
      continue
    steps = [r["step"] for r in rows]
    lm = np.array([r["train/lm_loss"] for r in rows])
    k = min(5, len(lm))
    smooth = np.convolve(lm, np.ones(k) / k, mode="valid")
    axs[0].plot(steps[k - 1:], smooth, label=p.parent.name)
    if "train/gate_loss" in rows[0]:
      axs[1].plot(steps, [r["train/gate_loss"] for r in rows], label=p.parent.name)
  axs[0].set_title("LM loss (5-step mean)")
  axs[1].set_title("gating loss (Stage B)")
  for ax in axs:
    ax.set_xlabel("step")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_all(sc, workdir: pathlib.Path, results: dict, out_dir: pathlib.Path) -> List[str]:
  written = []
  plot_radars(results, out_dir / "radar_families.png")
  written.append("radar_families.png")
  plot_tradeoff(results, out_dir / "tradeoff.png")
  written.append("tradeoff.png")
  if plot_gamma_sweep(sc, results, out_dir / "gamma_sweep.png"):
    written.append("gamma_sweep.png")
  if plot_training_curves(workdir, out_dir / "training_curves.png"):
    written.append("training_curves.png")
  for r, e in results["models"].items():
    if e.get("router_usage"):
      plot_router_usage(e["router_usage"], e.get("expert_names", ()), out_dir / f"router_{r}.png",
                        title=f"{r}: mean router probability per layer, by prompt axis")
      written.append(f"router_{r}.png")
  return written
