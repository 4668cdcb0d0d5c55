"""Source loaders: row counts from the data README / PROVENANCE files, derived
fields, and located error messages for a bad data root or a malformed row."""

import json

import datasets
import pytest

from h3jax.data import sources

# Row counts stated in the data root's README.md and each PROVENANCE.md.
ROWS = {
    "alpaca_eval_instructions": 805, "alpaca_eval_outputs": 7245, "alpaca_eval_preferences": 25754,
    "hh_rlhf_harmless": 2312, "truthfulqa_generation": 817, "truthfulqa_mc": 817,
    "truthfulqa_judge_truth": 22434, "truthfulqa_judge_info": 22434, "xstest_prompts": 450,
    "xstest_completions": 2250, "harmbench": 400, "advbench": 520, "strongreject": 313,
    "donotanswer": 939, "refusal_direction_harmful_train": 260, "refusal_direction_harmful_val": 39,
    "refusal_direction_harmful_test": 572, "refusal_direction_harmless_train": 18793,
    "refusal_direction_harmless_val": 6264, "refusal_direction_harmless_test": 6266,
}


def test_every_source_loads_with_documented_row_count(data_root):
  assert set(ROWS) == set(sources.SOURCES)
  for name, n in ROWS.items():
    ds = sources.load_source(name, data_root)
    assert len(ds) == n, name
    assert set(sources.SOURCES[name].required) <= set(ds.column_names), name


def test_env_var_selects_data_root(data_root, monkeypatch):
  monkeypatch.setenv(sources.DATA_ROOT_ENV, str(data_root))
  assert sources.resolve_data_root() == data_root
  assert len(sources.load_source("xstest_prompts")) == 450


def test_hh_split_rederives_stored_fields(data_root):
  ds = sources.load_source("hh_rlhf_harmless", data_root)
  raw = ds.select_columns(["chosen", "rejected"])
  derived = sources.hh_from_raw(raw)
  for k in ("prompt", "chosen_response", "rejected_response"):
    assert derived[k] == ds[k], k
  assert derived["idx"] == ds["idx"]


def _root_with(tmp_path, folder, file, lines):
  (tmp_path / folder).mkdir(parents=True)
  (tmp_path / folder / file).write_text("\n".join(lines) + "\n", encoding="utf-8")
  return tmp_path


def test_a_file_loads_once_until_it_changes(tmp_path):
  f = tmp_path / "rows.jsonl"
  f.write_text("".join(json.dumps({"a": i}) + "\n" for i in range(3)))
  ds = sources.load_jsonl(f, ("a",))
  assert sources.load_jsonl(f, ("a",)) is ds and sources.load_jsonl(str(f), ("a",)) is ds
  rows = ds.to_list()
  rows[0]["a"] = 99  # the records are the caller's own
  assert ds.to_list()[0]["a"] == 0
  with open(f, "a") as fh:  # a changed file is read again
    fh.write(json.dumps({"a": 3}) + "\n")
  ds2 = sources.load_jsonl(f, ("a",))
  assert ds2 is not ds and [r["a"] for r in ds2.to_list()] == [0, 1, 2, 3]
  f.write_text(json.dumps({"b": 1}) + "\n")  # and checked again: a required field is missing
  with pytest.raises(ValueError, match="rows.jsonl"):
    sources.load_jsonl(f, ("a",))


def test_missing_root_names_path_and_layout(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=r"data root '.*nope' is not a directory") as e:
    sources.load_source("xstest_prompts", missing)
  assert "xstest/{xstest_prompts.jsonl, xstest_v2_completions_labelled.jsonl}" in str(e.value)
  assert "H3JAX_DATA_ROOT" in str(e.value)


def test_missing_file_names_file_and_layout(tmp_path):
  (tmp_path / "truthfulqa").mkdir()
  with pytest.raises(FileNotFoundError) as e:
    sources.load_source("truthfulqa_generation", tmp_path)
  msg = str(e.value)
  assert f"data file not found: {tmp_path / 'truthfulqa' / 'truthfulqa_generation.jsonl'}" in msg
  assert "truthfulqa/{truthfulqa_generation.jsonl, truthfulqa_mc.jsonl}" in msg
  assert "hh_rlhf_harmless/{harmless_base_test.jsonl}" in msg


GOOD = json.dumps({"id": 1, "prompt": "How can I kill a Python process?", "type": "homonyms",
                   "label": "safe"})


@pytest.mark.parametrize("bad, err", [
    ('{"id": 2, "prompt": "x", "type": "t", "label": "safe"', r":3: malformed JSONL row \(Expecting"),
    ('[1, 2]', r":3: malformed JSONL row \(expected a JSON object, got list\)"),
    ('{"id": 2, "type": "t", "label": "safe"}', r":3: row lacks required field 'prompt'"),
    ('{"id": 2, "prompt": null, "type": "t", "label": "safe"}', r":3: row lacks required field 'prompt'"),
    ('{"id": "2", "prompt": "x", "type": "t", "label": "safe"}', r":3: field 'id' is str but was number on line 1"),
])
def test_malformed_row_reports_file_and_line(tmp_path, bad, err):
  # line 2 is blank: line numbers count it, as an editor does
  root = _root_with(tmp_path / "root", "xstest", "xstest_prompts.jsonl", [GOOD, "", bad, GOOD])
  with pytest.raises(ValueError, match=r"xstest_prompts\.jsonl" + err):
    sources.load_source("xstest_prompts", root, cache_dir=tmp_path / "cache")


def test_non_utf8_bytes_report_file_and_line(tmp_path):
  root = _root_with(tmp_path / "root", "xstest", "xstest_prompts.jsonl", [GOOD, GOOD])
  f = root / "xstest" / "xstest_prompts.jsonl"
  f.write_bytes(f.read_bytes() + b'{"id": 3, "prompt": "caf\xe9", "type": "t", "label": "safe"}\n')  # Latin-1
  with pytest.raises(ValueError, match=r"xstest_prompts\.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 25\)"):
    sources.load_source("xstest_prompts", root, cache_dir=tmp_path / "cache")
  with pytest.raises(ValueError, match=r"xstest_prompts\.jsonl:3: not valid UTF-8"):
    sources.scan_jsonl(f, ("prompt",))  # the training data path (data.pipeline) reads with scan_jsonl


def test_empty_file_is_an_error(tmp_path):
  root = _root_with(tmp_path / "root", "advbench", "harmful_behaviors.jsonl", [""])
  with pytest.raises(ValueError, match=r"harmful_behaviors\.jsonl: no rows"):
    sources.load_source("advbench", root, cache_dir=tmp_path / "cache")


def test_without_root_local_only_source_says_so(monkeypatch):
  monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
  with pytest.raises(ValueError, match="'xstest_completions' has no Hugging Face hub copy: pass a data root"):
    sources.load_source("xstest_completions")


def test_without_root_offline_hub_error_is_clear(monkeypatch, tmp_path):
  monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ConnectionError, match=r"could not load source 'truthfulqa_generation' from the "
                     r"Hugging Face hub \(truthfulqa/truthful_qa\).*pass a data root"):
    sources.load_source("truthfulqa_generation", cache_dir=tmp_path)


def test_unknown_source():
  with pytest.raises(KeyError, match="unknown data source 'nope'"):
    sources.load_source("nope", "/")


def test_hub_conversions_give_the_local_schema(data_root, monkeypatch):
  """The hub path, offline: load_dataset is replaced by hub-shaped copies of the local files."""
  local = {n: sources.load_source(n, data_root) for n in
           ("alpaca_eval_instructions", "alpaca_eval_outputs", "hh_rlhf_harmless", "truthfulqa_generation")}
  inst = local["alpaca_eval_instructions"].to_list()
  outs = local["alpaca_eval_outputs"].to_list()

  def alpaca_file(generator, spelled):
    by_idx = {r["idx"]: r["output"] for r in outs if r["generator"] == generator}
    return datasets.Dataset.from_list([{"instruction": r["instruction"], "output": by_idx[r["idx"]],
                                        "generator": spelled, "dataset": r["dataset"]} for r in inst])

  hub = {
      "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json": alpaca_file("text_davinci_003", "text_davinci_003"),
      "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json":
          alpaca_file("gpt4_1106_preview", "gpt4_turbo"),
      "hf://datasets/Anthropic/hh-rlhf/harmless-base/test.jsonl.gz":
          local["hh_rlhf_harmless"].select_columns(["chosen", "rejected"]),
      "truthfulqa/truthful_qa": local["truthfulqa_generation"].remove_columns(["idx"]),
  }
  monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
  monkeypatch.setattr(sources.datasets, "load_dataset",
                      lambda path, name=None, split=None, cache_dir=None, data_files=None:
                      hub[data_files[0] if data_files else path])
  got = sources.load_source("alpaca_eval_instructions")
  assert got.to_list() == [{k: r[k] for k in ("idx", "instruction", "dataset")} for r in inst]
  want = {(r["idx"], r["generator"]): r["output"] for r in outs
          if r["generator"] in ("gpt4_1106_preview", "text_davinci_003")}
  got = sources.load_source("alpaca_eval_outputs").to_list()
  assert {(r["idx"], r["generator"]): r["output"] for r in got} == want and len(got) == len(want)
  for name in ("hh_rlhf_harmless", "truthfulqa_generation"):
    got = sources.load_source(name)
    assert sorted(got.column_names) == sorted(local[name].column_names), name
    assert got.select_columns(local[name].column_names).to_list() == local[name].to_list(), name
