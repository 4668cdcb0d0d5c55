"""third_party/datasets.json: provenance manifest of the data root, and its check.

  python -m h3jax.data.manifest --data_root ../shared/data --out third_party/datasets.json
  python -m h3jax.data.manifest --data_root ../shared/data --check third_party/datasets.json

The manifest lists, per data folder, every file's sha256 and size, the
licence (the data README's table) and the PROVENANCE.md source and licence
lines; per loader source (`sources.SOURCES`) its file, row count, required
fields, Hugging Face hub id and split rule. It holds no paths or timestamps, so
regenerating it from unchanged data gives the same bytes.
"""

from __future__ import annotations

import json
import pathlib
import re

from absl import app
from absl import flags

from h3jax import io_atomic
from h3jax.data import sources
from h3jax.data.sources import sha256_file  # noqa: F401  (manifest.sha256_file)

FORMAT = "h3jax-datasets-manifest/1"
COMMAND = "python -m h3jax.data.manifest --data_root ../shared/data --out third_party/datasets.json"
SPLIT_RULE = {
    "bucket": 'int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100',
    "train": "bucket(key) < 50", "eval": "bucket(key) >= 50",
    "reference": "shared/data/README.md, 'Suggested train/eval split convention'",
}
# The data README's licence column, per folder.
LICENCES = {
    "advbench": "MIT", "alpaca_eval": "Apache-2.0 repo; data CC BY-NC 4.0; outputs per provider",
    "donotanswer": "Apache-2.0", "harmbench": "MIT", "hh_rlhf_harmless": "MIT",
    "refusal_direction": "mixed: MIT sources + Alpaca CC BY-NC 4.0", "strongreject": "MIT (upstream)",
    "truthfulqa": "Apache-2.0", "truthfulqa_judge": "Apache-2.0",
    "xstest": "CC-BY-4.0 (prompts); completions per model provider",
}
_TRAIN_EVAL = "train: bucket(key) < 50, eval: bucket(key) >= 50"
SPLITS = {
    "alpaca_eval_instructions": "key = instruction; train (SFT): bucket < 50 and idx >= 50; eval: the rest "
                                "(idx 0-49 always eval)",
    "alpaca_eval_outputs": "follows alpaca_eval_instructions by idx; gpt4_1106_preview = SFT target",
    "alpaca_eval_preferences": "judge-train: idx in the SFT train split; judge-eval: the other idx",
    "hh_rlhf_harmless": f"key = prompt; {_TRAIN_EVAL}",
    "truthfulqa_generation": f"key = question.strip(); {_TRAIN_EVAL} (alternative: paper rule idx < 408)",
    "truthfulqa_mc": f"key = question.strip(); {_TRAIN_EVAL}; eval only",
    "truthfulqa_judge_truth": f"key = the question parsed from 'Q: ...\\nA:'; {_TRAIN_EVAL}",
    "truthfulqa_judge_info": f"key = the question parsed from 'Q: ...\\nA:'; {_TRAIN_EVAL}",
    "xstest_prompts": "eval only (never trained on)",
    "xstest_completions": f"key = xstest_prompts prompt of id v2-N; {_TRAIN_EVAL} (judge)",
    "harmbench": "eval only: split == test, standard + contextual; val for tuning",
    "advbench": "eval only, minus goals in refusal_direction_harmful_train",
    "strongreject": "eval only", "donotanswer": "eval only",
}


def _provenance_line(text: str, label: str) -> str:
  m = re.search(rf"^\*\*{label}\.\*\*\s*(.*)$", text, re.M)
  return " ".join(m.group(1).replace("`", "").split()) if m else ""


def build_manifest(data_root) -> dict:
  """The manifest dict of a data root (see the module docstring)."""
  root = sources.resolve_data_root(data_root)
  if root is None:
    raise ValueError(f"a data root is needed (--data_root or ${sources.DATA_ROOT_ENV})")
  folders = {}
  for folder in sorted({s.folder for s in sources.SOURCES.values()}):
    d = root / folder
    if not d.is_dir():
      raise FileNotFoundError(f"data folder not found: {d}; {sources._layout_hint()}")
    prov = (d / "PROVENANCE.md").read_text(encoding="utf-8") if (d / "PROVENANCE.md").is_file() else ""
    folders[folder] = {
        "licence": LICENCES.get(folder, "see PROVENANCE.md"),
        "provenance_source": _provenance_line(prov, "Source"),
        "provenance_licence": _provenance_line(prov, "Licence"),
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for p in sorted(d.iterdir()) if p.is_file()},
    }
  srcs = {}
  for name, s in sorted(sources.SOURCES.items()):
    hub = [h.data_files[0] if h.data_files else "/".join(x for x in (h.path, h.name, h.split) if x)
           for h in s.hub]
    split = SPLITS.get(name, "prompt pool (no responses); see the data README")
    srcs[name] = {"folder": s.folder, "file": s.file, "rows": len(sources.load_source(name, root)),
                  "required_fields": list(s.required), "hub": hub, "split": split}
  return {"format": FORMAT, "generated_by": COMMAND, "split_rule": SPLIT_RULE, "folders": folders,
          "sources": srcs}


def dumps(manifest: dict) -> str:
  return json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=False) + "\n"


def write_manifest(data_root, out) -> pathlib.Path:
  """Builds the manifest and writes it atomically (temp file + rename)."""
  out = pathlib.Path(out)
  text = dumps(build_manifest(data_root))
  io_atomic.write_text(out, text)
  return out


def check_manifest(data_root, manifest_path) -> None:
  """Raises ValueError listing every file or count that differs from the manifest."""
  manifest_path = pathlib.Path(manifest_path)
  if not manifest_path.is_file():
    raise FileNotFoundError(f"manifest not found: {manifest_path} (create it with: {COMMAND})")
  want = json.loads(manifest_path.read_text(encoding="utf-8"))
  have = build_manifest(data_root)
  problems = []
  for folder in sorted(set(want["folders"]) | set(have["folders"])):
    wf = want["folders"].get(folder, {}).get("files", {})
    hf = have["folders"].get(folder, {}).get("files", {})
    for name in sorted(set(wf) | set(hf)):
      if name not in hf:
        problems.append(f"{folder}/{name}: missing from the data root")
      elif name not in wf:
        problems.append(f"{folder}/{name}: not in the manifest")
      elif wf[name]["sha256"] != hf[name]["sha256"]:
        problems.append(f"{folder}/{name}: sha256 {hf[name]['sha256'][:12]}... != manifest "
                        f"{wf[name]['sha256'][:12]}...")
  for name, s in have["sources"].items():
    w = want["sources"].get(name)
    if w is None or w["rows"] != s["rows"]:
      problems.append(f"source {name}: {s['rows']} rows, manifest says {w and w['rows']}")
  if not problems and have != want:
    problems.append("manifest metadata differs from a fresh build (licence/split text or format)")
  if problems:
    raise ValueError(f"data root does not match {manifest_path}:\n  " + "\n  ".join(problems))


FLAGS = flags.FLAGS


def define_flags():
  """Defines this CLI's flags (only when run as a program, so importing the module
  never collides with other CLIs' flags of the same name)."""
  flags.DEFINE_string("data_root", None, f"Data root (default ${sources.DATA_ROOT_ENV}).")
  flags.DEFINE_string("out", None, "Write the manifest here.")
  flags.DEFINE_string("check", None, "Check the data root against this manifest instead.")


def main(argv):
  del argv
  if bool(FLAGS.out) == bool(FLAGS.check):
    raise app.UsageError("pass exactly one of --out or --check")
  if FLAGS.check:
    check_manifest(FLAGS.data_root, FLAGS.check)
    print(f"ok: {FLAGS.check} matches the data root")
  else:
    print(f"wrote {write_manifest(FLAGS.data_root, FLAGS.out)}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
