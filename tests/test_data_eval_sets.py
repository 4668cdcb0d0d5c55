"""Eval-only sets and judge data: the data README's counts (its oracles), split
consistency with the SFT splits, and located errors."""

import collections
import json
import shutil

import pytest

from h3jax.data import eval_sets as es
from h3jax.data import splits


def test_prompt_set_counts(data_root):
  assert len(es.harmbench("test", data_root)) == 240 and len(es.harmbench("val", data_root)) == 80
  assert len(es.strongreject(data_root)) == 313 and len(es.donotanswer(data_root)) == 939
  assert len(es.advbench(data_root)) == 520 - 117 and len(es.advbench(data_root, drop_trained=False)) == 520
  assert len(es.xstest("safe", data_root)) == 250 and len(es.xstest("unsafe", data_root)) == 200
  assert all(i["type"].startswith("contrast_") for i in es.xstest("unsafe", data_root))
  ids = [i["id"] for i in es.harmbench("test", data_root)]
  assert len(set(ids)) == len(ids)
  cats = collections.Counter(i["category"] for i in es.harmbench("test", data_root))
  assert set(cats) == {"standard", "contextual"}


def test_harmbench_contextual_prompt(data_root):
  item = next(i for i in es.harmbench("test", data_root) if i["category"] == "contextual")
  context, behaviour = item["prompt"].split("\n\n---\n\n")
  assert context and behaviour and not behaviour.startswith("\n")


def test_truthfulqa_mc_uses_the_generation_split(data_root):
  mc = es.truthfulqa_mc("eval", data_root)
  assert len(mc) == 415 and len(es.truthfulqa_mc("train", data_root)) == 402
  assert {i["key"] for i in mc} == splits.split_keys(splits.honesty("eval", data_root))
  for i in mc[:20]:
    assert sum(i["mc1_targets"]["labels"]) == 1 and len(i["mc2_targets"]["choices"]) == len(i["mc2_targets"]["labels"])


def test_alpaca_references_cover_eval_instructions(data_root):
  davinci = es.alpaca_eval_references("text_davinci_003", data_root)
  assert len(davinci) == 433 and sorted(es.alpaca_eval_references("gpt4_1106_preview", data_root,
                                                                  subset="paper")) == list(range(50))
  assert not set(davinci) & {r["meta"]["idx"] for r in splits.helpfulness("train", data_root)}


def test_xstest_judge_split(data_root):
  tr, ev = es.xstest_judge("train", data_root), es.xstest_judge("eval", data_root)
  assert (len(tr), len(ev)) == (1195, 1055)
  kt, ke = {r["key"] for r in tr}, {r["key"] for r in ev}
  assert (len(kt), len(ke)) == (239, 211) and not kt & ke
  assert all(splits.bucket(k) < 50 for k in kt) and all(splits.bucket(k) >= 50 for k in ke)
  assert collections.Counter(r["model"] for r in tr + ev).most_common()[-1][1] == 450  # 5 models x 450
  # id 195's text differs between the files; the prompts file's text is the key
  row = next(r for r in tr + ev if r["id"] == "v2-195")
  assert "my enemy's death" in row["prompt"] and "someone's death" in row["key"]


def test_truthfulqa_judge_split(data_root):
  for kind in ("truth", "info"):
    tr, ev = es.truthfulqa_judge(kind, "train", data_root), es.truthfulqa_judge(kind, "eval", data_root)
    assert (len(tr), len(ev)) == (11066, 11368)
    assert not {r["key"] for r in tr} & {r["key"] for r in ev}
    assert {r["completion"] for r in tr + ev} == {" yes", " no"}
  allrows = es.truthfulqa_judge("truth", "all", data_root)
  assert len(allrows) == 22434 and allrows[0]["label"] == (allrows[0]["completion"] == " yes")


def test_alpaca_preferences_split(data_root):
  tr, ev = es.alpaca_preferences("train", data_root), es.alpaca_preferences("eval", data_root)
  assert (len(tr), len(ev)) == (2604, 3031)  # 372 x 7 and 433 x 7
  assert {r["generator_2"] for r in tr} == {"claude-2", "gpt-3.5-turbo-0301", "gemma-7b-it", "wizardlm-13b",
                                          "vicuna-7b", "alpaca-7b", "oasst-sft-pythia-12b"}
  assert {r["idx"] for r in tr} == {r["meta"]["idx"] for r in splits.helpfulness("train", data_root)}
  assert all(1.0 <= r["preference"] <= 2.0 and r["output_1"] and r["output_2"] for r in tr + ev)


def test_bad_arguments_and_rows(data_root, tmp_path):
  with pytest.raises(ValueError, match=r"split must be one of \('test', 'val'\), got 'eval'"):
    es.harmbench("eval", data_root)
  with pytest.raises(ValueError, match=r"split must be one of \('truth', 'info'\), got 'honesty'"):
    es.truthfulqa_judge("honesty", "train", data_root)
  root = tmp_path / "root"
  shutil.copytree(data_root / "xstest", root / "xstest")
  comp = root / "xstest" / "xstest_v2_completions_labelled.jsonl"
  comp.chmod(0o644)
  lines = comp.read_text(encoding="utf-8").splitlines()
  row = json.loads(lines[2])
  row["id"] = "v3-7"
  lines[2] = json.dumps(row)
  comp.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"xstest_v2_completions_labelled.jsonl row 3: id 'v3-7' matches no"):
    es.xstest_judge("train", root)
