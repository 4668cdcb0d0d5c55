"""One loader per data source, returning a `datasets.Dataset` in the local schema.

A source is read from a data root (the 3H data folder, which documents itself in
its own README.md; `expected_layout()` lists the files read here and
third_party/datasets.json their checksums), given as an argument or through
`$H3JAX_DATA_ROOT`. Without a root the
matching Hugging Face hub copy is loaded (users with network) and converted to
the same schema, so every caller sees the same fields whichever way it came.
Hub conversions are written from the hub datasets' documented layouts and were
not exercised offline; sources without a hub twin need a data root.

Local JSONL is read with `datasets.load_dataset("json")` (fast, cached). Its
parse errors do not say where, so on failure (or for a null required field) the
file is re-scanned here and the error names the file and 1-based line number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Callable, Optional, Sequence, Tuple

import datasets

DATA_ROOT_ENV = "H3JAX_DATA_ROOT"
_ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class Hub:
  """Where a source lives on the HF hub: a dataset id, or raw files (`hf://` URLs)."""
  path: str  # dataset id, or a `load_dataset` builder name ("json") when data_files is set
  name: Optional[str] = None
  split: str = "train"
  data_files: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Source:
  folder: str
  file: str
  required: Tuple[str, ...]  # fields that must be present and non-null in every row
  hub: Tuple[Hub, ...] = ()  # empty: local only
  from_hub: Optional[Callable] = None  # list of hub Datasets -> Dataset in the local schema


def _alpaca_instructions_from_hub(parts):
  ds, = parts
  return datasets.Dataset.from_dict({"idx": list(range(len(ds))), "instruction": ds["instruction"],
                                     "dataset": ds["dataset"]})


def _alpaca_outputs_from_hub(parts):
  cols = {"idx": [], "generator": [], "output": []}
  # the AlpacaEval 2.0 baseline file is gpt4_1106_preview by definition, whatever its generator
  # field spells; alpaca_eval.json holds the text_davinci_003 outputs
  for ds, name in zip(parts, ("gpt4_1106_preview", None)):
    cols["idx"] += list(range(len(ds)))
    cols["generator"] += [name] * len(ds) if name else list(ds["generator"])
    cols["output"] += list(ds["output"])
  return datasets.Dataset.from_dict(cols)


def split_hh_dialogue(chosen: str, rejected: str) -> Tuple[str, str, str]:
  """(prompt, chosen_response, rejected_response) of an HH-RLHF pair.

  The prompt is the shared prefix of both transcripts cut after its last
  "\\n\\nAssistant:"; this reproduces the data root's derived fields exactly
  (5 rows of the test split diverge before the final turn).
  """
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(_ASSISTANT)
  if cut < 0:
    raise ValueError(f"HH-RLHF pair has no shared '\\n\\nAssistant:' turn: {chosen[:80]!r}")
  end = cut + len(_ASSISTANT)
  return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def hh_from_raw(ds: datasets.Dataset) -> datasets.Dataset:
  """Adds idx, prompt, chosen_response, rejected_response to raw {chosen, rejected} rows."""
  cols = {"idx": [], "chosen": [], "rejected": [], "prompt": [], "chosen_response": [],
          "rejected_response": []}
  for i, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"])):
    p, cr, rr = split_hh_dialogue(c, r)
    for k, v in zip(cols, (i, c, r, p, cr, rr)):
      cols[k].append(v)
  return datasets.Dataset.from_dict(cols)


def _with_idx(parts):
  ds, = parts
  return ds.add_column("idx", list(range(len(ds))))


SOURCES = {
    "alpaca_eval_instructions": Source(
        "alpaca_eval", "alpaca_eval_instructions.jsonl", ("idx", "instruction", "dataset"),
        hub=(Hub("json", data_files=("hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json",)),),
        from_hub=_alpaca_instructions_from_hub),
    "alpaca_eval_outputs": Source(
        "alpaca_eval", "model_outputs.jsonl", ("idx", "generator", "output"),
        hub=(Hub("json", data_files=("hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json",)),
             Hub("json", data_files=("hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json",))),
        from_hub=_alpaca_outputs_from_hub),
    "alpaca_eval_preferences": Source(
        "alpaca_eval", "preferences_weighted_gpt4_turbo.jsonl",
        ("idx", "generator_1", "generator_2", "preference")),
    "hh_rlhf_harmless": Source(
        "hh_rlhf_harmless", "harmless_base_test.jsonl",
        ("idx", "chosen", "rejected", "prompt", "chosen_response", "rejected_response"),
        hub=(Hub("json", data_files=("hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz",)),),
        from_hub=lambda parts: hh_from_raw(parts[0])),
    "truthfulqa_generation": Source(
        "truthfulqa", "truthfulqa_generation.jsonl",
        ("idx", "question", "best_answer", "correct_answers", "incorrect_answers"),
        hub=(Hub("truthfulqa/truthful_qa", "generation", "validation"),), from_hub=_with_idx),
    "truthfulqa_mc": Source(  # hub rows lack `generation_idx`: join on question.strip()
        "truthfulqa", "truthfulqa_mc.jsonl", ("idx", "question", "mc1_targets", "mc2_targets"),
        hub=(Hub("truthfulqa/truthful_qa", "multiple_choice", "validation"),), from_hub=_with_idx),
    "truthfulqa_judge_truth": Source("truthfulqa_judge", "finetune_truth.jsonl", ("prompt", "completion")),
    "truthfulqa_judge_info": Source("truthfulqa_judge", "finetune_info.jsonl", ("prompt", "completion")),
    "xstest_prompts": Source(
        "xstest", "xstest_prompts.jsonl", ("id", "prompt", "type", "label"),
        hub=(Hub("natolambert/xstest-v2-copy", split="prompts"),), from_hub=lambda parts: parts[0]),
    "xstest_completions": Source(
        "xstest", "xstest_v2_completions_labelled.jsonl",
        ("model", "id", "prompt", "completion", "final_label")),
    "harmbench": Source(
        "harmbench", "harmbench_behaviors_text_all.jsonl",
        ("behavior_id", "behavior", "functional_category", "context_string", "split")),
    "advbench": Source("advbench", "harmful_behaviors.jsonl", ("idx", "goal", "target")),
    "strongreject": Source("strongreject", "strongreject_dataset.jsonl", ("idx", "category", "forbidden_prompt")),
    "donotanswer": Source("donotanswer", "donotanswer_prompts.jsonl", ("idx", "risk_area", "prompt")),
    **{f"refusal_direction_{kind}_{split}": Source(
        "refusal_direction", f"{kind}_{split}.jsonl", ("instruction",))
       for kind in ("harmful", "harmless") for split in ("train", "val", "test")},
}


def expected_layout() -> str:
  """The data-root layout the loaders expect, one folder per line."""
  folders = {}
  for s in SOURCES.values():
    folders.setdefault(s.folder, []).append(s.file)
  return "\n".join(f"  {d}/{{{', '.join(sorted(fs))}}}" for d, fs in sorted(folders.items()))


def _layout_hint() -> str:
  return (f"expected layout under the data root (checksums: third_party/datasets.json; set it with "
          f"--data_root or ${DATA_ROOT_ENV}):\n{expected_layout()}")


def resolve_data_root(data_root=None) -> Optional[pathlib.Path]:
  """data_root arg, else $H3JAX_DATA_ROOT, else None (meaning: use the HF hub)."""
  root = data_root if data_root not in (None, "") else os.environ.get(DATA_ROOT_ENV) or None
  if root is None:
    return None
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"data root {str(root)!r} is not a directory; {_layout_hint()}")
  return root


def source_path(name: str, data_root) -> pathlib.Path:
  src = _source(name)
  root = resolve_data_root(data_root)
  if root is None:
    raise ValueError(f"source {name!r} needs a data root (--data_root or ${DATA_ROOT_ENV})")
  path = root / src.folder / src.file
  if not path.is_file():
    raise FileNotFoundError(f"data file not found: {path} (source {name!r}); {_layout_hint()}")
  return path


def _source(name: str) -> Source:
  if name not in SOURCES:
    raise KeyError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
  return SOURCES[name]


def scan_jsonl(path, required: Sequence[str] = ()):
  """Parses a JSONL file strictly; returns (rows, line numbers). Errors name file:line.

  Checks: valid JSON, one object per line, required fields present and not
  null, and one JSON type per field (int and float mix) since Arrow needs that.
  """
  rows, lines, types = [], [], {}
  with open(path, "rb") as f:  # bytes: a non-UTF-8 byte is reported with its line, not mid-iteration
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         f"re-encode the file as UTF-8") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSONL row ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{where}: malformed JSONL row (expected a JSON object, got {type(row).__name__})")
      for k in required:
        if row.get(k) is None:
          raise ValueError(f"{where}: row lacks required field {k!r} (required: {list(required)})")
      for k, v in row.items():
        if v is None:
          continue
        t = "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__
        if types.setdefault(k, (t, lineno))[0] != t:
          raise ValueError(f"{where}: field {k!r} is {t} but was {types[k][0]} on line {types[k][1]}")
      rows.append(row)
      lines.append(lineno)
  if not rows:
    raise ValueError(f"{path}: no rows (empty JSONL file)")
  return rows, lines


def _is_utf8(path) -> bool:
  try:
    pathlib.Path(path).read_bytes().decode("utf-8")
  except UnicodeDecodeError:
    return False
  return True


def load_jsonl(path, required: Sequence[str] = (), *, cache_dir=None) -> datasets.Dataset:
  """A JSONL file as a Dataset via the `datasets` JSON loader, with located errors. One load per process
  while the file is unchanged (keyed by its inode, size and times): an in-process study loads the same
  sources in every evaluation stage (`load_eval_sets`: 0.34 s a call through the loader, 0.05-0.15 s with
  this). A Dataset is immutable and `to_list()` builds new records, so no caller changes what the next gets."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"data file not found: {path}")
  st = path.resolve().stat()
  key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, tuple(required), str(cache_dir))
  if key not in _LOADED:
    while len(_LOADED) >= 32:
      _LOADED.pop(next(iter(_LOADED)))  # the oldest
    _LOADED[key] = _load_jsonl(path, required, cache_dir)
  return _LOADED[key]


_LOADED: dict = {}


def _load_jsonl(path: pathlib.Path, required: Sequence[str], cache_dir) -> datasets.Dataset:
  try:
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
  except Exception as e:  # the loader's message has no line number: locate it ourselves
    scan_jsonl(path, required)
    raise ValueError(f"{path}: the datasets JSON loader failed: {e!r}") from e
  missing = [k for k in required if k not in ds.column_names]
  if missing or any(ds.data.column(k).null_count for k in required) or not _is_utf8(path):
    scan_jsonl(path, required)  # raises with the line number (the JSON loader passes bad UTF-8 through)
  return ds


def load_source(name: str, data_root=None, *, cache_dir=None) -> datasets.Dataset:
  """Source `name` (a key of SOURCES) from the data root, or from the HF hub if none is set."""
  src = _source(name)
  if resolve_data_root(data_root) is not None:
    return load_jsonl(source_path(name, data_root), src.required, cache_dir=cache_dir)
  if not src.hub:
    raise ValueError(f"source {name!r} has no Hugging Face hub copy: pass a data root "
                     f"(--data_root or ${DATA_ROOT_ENV}); {_layout_hint()}")
  try:
    parts = [datasets.load_dataset(h.path, h.name, split=h.split, cache_dir=cache_dir,
                                   data_files=list(h.data_files) or None) for h in src.hub]
  except Exception as e:
    ids = ", ".join(h.data_files[0] if h.data_files else h.path for h in src.hub)
    raise ConnectionError(f"could not load source {name!r} from the Hugging Face hub ({ids}): {e}; "
                          f"without network pass a data root instead; {_layout_hint()}") from e
  return src.from_hub(parts)


def sha256_file(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()
