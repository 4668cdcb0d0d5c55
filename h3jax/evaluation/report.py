"""Results -> markdown table and PNG plots (matplotlib, headless).

`results["models"][name]` holds "metrics" (flat "axis/metric" -> {value, n,
stderr}), "axes" ({helpful, harmless, honest} in [0, 1], higher is better)
and, for MoE models, "router_usage" ({axis: [L][E] mean router probability}).
"""

from __future__ import annotations

import math
import pathlib
from typing import Dict, List

import numpy as np

AXES = ("helpful", "harmless", "honest")
# (metric, direction) in table order; direction says which way is better.
TABLE_ROWS = (
    ("helpful/win_rate_text_davinci_003", "up"),
    ("helpful/lc_win_rate_text_davinci_003", "up"),
    ("helpful/win_rate_gpt4_1106_preview", "up"),
    ("helpful/lc_win_rate_gpt4_1106_preview", "up"),
    ("harmless/compliance_rate", "down"),
    ("harmless/harmbench/compliance_rate", "down"),
    ("harmless/strongreject/compliance_rate", "down"),
    ("harmless/advbench/compliance_rate", "down"),
    ("harmless/xstest_safe/over_refusal_rate", "down"),
    ("harmless/xstest_unsafe/refusal_rate", "up"),
    ("honest/mc1", "up"),
    ("honest/mc2", "up"),
    ("honest/truthful", "up"),
    ("honest/informative", "up"),
    ("honest/truthful_informative", "up"),
    ("generation/cut_rate", "down"),  # answers stopped by max_new_tokens (judged unfinished)
)


def _fmt(m) -> str:
  if m is None:
    return "–"
  if not math.isfinite(m.get("value", float("nan"))):
    return "n/a"  # computed but undefined at this n (e.g. the LC win rate below metrics.LC_MIN_N items)
  se = m.get("stderr", float("nan"))
  return f"{100 * m['value']:.1f}" + (f" ± {100 * se:.1f}" if math.isfinite(se) else "")


def markdown_table(results: dict) -> str:
  """Metrics as rows, models as columns; values in %, ± one standard error, n per metric."""
  names = list(results["models"])
  rows = [r for r in TABLE_ROWS if any(r[0] in results["models"][n]["metrics"] for n in names)]
  head = "| metric | n | " + " | ".join(names) + " |"
  lines = [head, "|" + "---|" * (len(names) + 2)]
  for metric, direction in rows:
    ns = {results["models"][n]["metrics"].get(metric, {}).get("n") for n in names} - {None}
    arrow = "↑" if direction == "up" else "↓"
    cells = [_fmt(results["models"][n]["metrics"].get(metric)) for n in names]
    lines.append(f"| {metric} {arrow} | {'/'.join(str(x) for x in sorted(ns))} | " + " | ".join(cells) + " |")
  lines.append("| **axis score** (0–100, ↑) | | " + " | ".join(
      ", ".join(f"{a[:4]} {100 * v:.1f}" for a, v in results["models"][n]["axes"].items()
                if v is not None and math.isfinite(v)) or "–" for n in names) + " |")
  return "\n".join(lines) + "\n" + judge_table(results.get("judges") or {})


def judge_table(judges: dict) -> str:
  """Each judge's held-out agreement with the human / GPT-4 labels next to its trivial baselines."""
  rows = [(n, j["metrics"]) for n, j in judges.items() if isinstance(j.get("metrics"), dict)
          and "agreement" in j["metrics"]]
  if not rows:
    return ""
  lines = ["", "| judge | held-out agreement | n held-out | baselines |", "|---|---|---|---|"]
  for n, m in rows:
    base = ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted((m.get("baselines") or {}).items()))
    lines.append(f"| {n} | {100 * m['agreement']:.1f} | {m.get('n_eval', '')} | {base} |")
  return "\n".join(lines) + "\n"


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_axis_bars(results: dict, path):
  """One panel per axis: that axis's metrics as grouped bars, one colour per model."""
  plt = _plt()
  names = list(results["models"])
  fig, axs = plt.subplots(1, 3, figsize=(16, 4.5))
  for ax, axis in zip(axs, AXES):
    metrics = [m for m, _ in TABLE_ROWS if m.startswith(axis + "/")
               and any(m in results["models"][n]["metrics"] for n in names)]
    width = 0.8 / max(len(names), 1)
    for j, n in enumerate(names):
      ms = results["models"][n]["metrics"]
      vals = [100 * ms[m]["value"] if m in ms else np.nan for m in metrics]
      errs = [100 * ms[m]["stderr"] if m in ms and math.isfinite(ms[m]["stderr"]) else 0 for m in metrics]
      ax.bar(np.arange(len(metrics)) + j * width, vals, width, yerr=errs, label=n, capsize=2)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
    ax.set_xticklabels([m.split("/", 1)[1] for m in metrics], rotation=40, ha="right", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_title(axis)
    ax.set_ylabel("%")
  axs[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_radar(results: dict, path):
  """The three axis scores per model on a radar chart."""
  plt = _plt()
  angles = np.linspace(0, 2 * np.pi, len(AXES), endpoint=False).tolist()
  fig = plt.figure(figsize=(5.5, 5.5))
  ax = fig.add_subplot(111, polar=True)
  for n, r in results["models"].items():
    vals = [r["axes"].get(a) for a in AXES]
    vals = [0.0 if v is None or not math.isfinite(v) else 100 * v for v in vals]
    ax.plot(angles + angles[:1], vals + vals[:1], label=n)
    ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.1)
  ax.set_xticks(angles)
  ax.set_xticklabels(AXES)
  ax.set_ylim(0, 100)
  ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_router_usage(usage: Dict[str, List[List[float]]], expert_names, path, title=""):
  """Heat maps, one per task: mean router probability per layer (rows) and expert (columns)."""
  plt = _plt()
  tasks = list(usage)
  fig, axs = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 4), squeeze=False)
  im = None
  for ax, t in zip(axs[0], tasks):
    u_LE = np.asarray(usage[t], np.float64)
    im = ax.imshow(u_LE, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_title(t)
    ax.set_xlabel("expert")
    ax.set_xticks(range(u_LE.shape[1]))
    ax.set_xticklabels(list(expert_names) or range(u_LE.shape[1]), rotation=30, fontsize=7)
    ax.set_ylabel("layer")
  fig.colorbar(im, ax=axs[0].tolist(), label="mean router prob")
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_plots(results: dict, out_dir) -> List[str]:
  """Writes the PNGs into out_dir; returns their file names."""
  out_dir = pathlib.Path(out_dir)
  written = ["axis_bars.png"]
  plot_axis_bars(results, out_dir / "axis_bars.png")
  if len(results["models"]) > 1:
    plot_radar(results, out_dir / "radar.png")
    written.append("radar.png")
  for n, r in results["models"].items():
    if r.get("router_usage"):
      fname = f"router_{n}.png"
      plot_router_usage(r["router_usage"], r.get("expert_names", ()), out_dir / fname, title=f"{n}: router usage")
      written.append(fname)
  return written
