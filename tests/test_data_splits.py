"""Hash splits: the data README's counts (its oracles), disjointness, stability
and leakage between SFT sets and every evaluation set."""

import collections
import hashlib
import random

import pytest

from h3jax.data import sources
from h3jax.data import splits


def readme_bucket(key):  # verbatim from the data root's README.md (third_party/datasets.json, split_rule)
  return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def test_bucket_hand_computed():
  # sha256("") = e3b0c442...; 0xe3b0c442 = 3820012610
  assert splits.bucket("") == 3820012610 % 100 == 10
  rng = random.Random(0)
  for _ in range(200):
    key = "".join(rng.choice("abcé xyz?\n") for _ in range(rng.randint(0, 30)))
    assert splits.bucket(key) == readme_bucket(key)


@pytest.fixture(scope="module")
def all_splits(data_root):
  return {
      "help_train": splits.helpfulness("train", data_root),
      "help_eval": splits.helpfulness("eval", data_root),
      "help_paper": splits.helpfulness("eval", data_root, subset="paper"),
      "harm_train": splits.harmlessness("train", data_root),
      "harm_train_all": splits.harmlessness("train", data_root, drop_empty=False),
      "harm_eval": splits.harmlessness("eval", data_root),
      "hon_train": splits.honesty("train", data_root),
      "hon_eval": splits.honesty("eval", data_root),
      "hon_paper_train": splits.honesty("train", data_root, rule="paper"),
      "hon_paper_eval": splits.honesty("eval", data_root, rule="paper"),
  }


def test_readme_counts(all_splits):
  s = all_splits
  assert len(s["help_train"]) == 372 and len(s["help_eval"]) == 433 and len(s["help_paper"]) == 50
  assert collections.Counter(r["meta"]["dataset"] for r in s["help_train"]) == {
      "selfinstruct": 126, "oasst": 85, "koala": 81, "helpful_base": 41, "vicuna": 39}
  assert sorted(r["meta"]["idx"] for r in s["help_paper"]) == list(range(50))
  assert len(s["harm_train_all"]) == 1161 and len(s["harm_train"]) == 1160
  assert sum(len(r["meta"]["messages"]) == 1 for r in s["harm_train_all"]) == 330
  assert len(s["harm_eval"]) == 1151
  assert splits.unique_count(s["hon_train"]) == 402 and len(s["hon_train"]) == 1401
  assert len(s["hon_eval"]) == 415
  assert splits.unique_count(s["hon_paper_train"]) == 408 and len(s["hon_paper_train"]) == 1548
  assert len(s["hon_paper_eval"]) == 409
  # "204 of the first 408 questions fall in the hash train split"
  assert len(splits.split_keys(s["hon_paper_train"]) & splits.split_keys(s["hon_train"])) == 204


def test_record_schema_and_task_labels(all_splits):
  want = {"instruction", "input", "response", "task", "source", "key", "meta"}
  for name, recs in all_splits.items():
    task = {"help": 0, "harm": 1, "hon": 2}[name.split("_")[0]]
    for r in recs:
      assert set(r) == want and r["task"] == task and r["input"] == ""
      assert isinstance(r["instruction"], str) and r["instruction"]


def test_disjoint_and_exhaustive(all_splits, data_root):
  s = all_splits
  for tr, ev, n_keys in (("help_train", "help_eval", 805), ("harm_train_all", "harm_eval", 2310),
                         ("hon_train", "hon_eval", 817), ("hon_paper_train", "hon_paper_eval", 817)):
    a, b = splits.split_keys(s[tr]), splits.split_keys(s[ev])
    assert not a & b, (tr, ev)
    assert len(a | b) == n_keys, (tr, ev)
  # the rule itself: train keys are bucket < 50, except AlpacaEval idx 0..49
  assert all(readme_bucket(r["key"]) < 50 and r["meta"]["idx"] >= 50 for r in s["help_train"])
  assert all(readme_bucket(r["key"]) >= 50 or r["meta"]["idx"] < 50 for r in s["help_eval"])
  assert any(readme_bucket(r["key"]) < 50 for r in s["help_paper"])  # the exception matters
  assert all(readme_bucket(r["key"]) < 50 for r in s["harm_train_all"] + s["hon_train"])
  assert all(readme_bucket(r["key"]) >= 50 for r in s["harm_eval"] + s["hon_eval"])
  assert all(r["meta"]["idx"] < 408 for r in s["hon_paper_train"])


def test_stable_across_calls(all_splits, data_root):
  again = splits.axis_split("honest", "train", data_root)
  assert again == all_splits["hon_train"]
  assert splits.axis_split(0, "eval", data_root) == all_splits["help_eval"]


def test_targets_are_the_documented_fields(all_splits, data_root):
  gpt4 = splits.reference_outputs("gpt4_1106_preview", data_root)
  assert len(gpt4) == 805
  assert all(r["response"] == gpt4[r["meta"]["idx"]] for r in all_splits["help_train"])
  assert len(splits.reference_outputs("text_davinci_003", data_root)) == 805
  per_q = collections.defaultdict(list)
  for r in all_splits["hon_train"]:  # one pair per correct answer, never an incorrect-only one
    per_q[r["key"]].append(r["response"])
  assert all(v == next(r["meta"]["correct_answers"] for r in all_splits["hon_train"] if r["key"] == k)
             for k, v in per_q.items())
  assert all(r["response"] == r["meta"]["best_answer"] for r in all_splits["hon_eval"])
  hh = {r["idx"]: r for r in sources.load_source("hh_rlhf_harmless", data_root).to_list()}
  for r in all_splits["harm_train"]:
    row = hh[r["meta"]["idx"]]
    assert r["response"] == row["chosen_response"] and r["response"].strip()
    assert r["key"] == row["prompt"]


def test_hh_messages_alternate(all_splits):
  for r in all_splits["harm_train_all"] + all_splits["harm_eval"]:
    roles = [m["role"] for m in r["meta"]["messages"]]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
    if len(roles) == 1:
      assert r["instruction"] == r["meta"]["messages"][0]["content"]
    else:
      assert r["instruction"].startswith("Human: ") and not r["instruction"].endswith("Assistant:")


def _norm(text):
  return " ".join(text.lower().split())


def test_no_eval_prompt_in_any_sft_set(all_splits, data_root):
  sft = {_norm(r["instruction"]) for k in ("help_train", "harm_train_all", "hon_train")
         for r in all_splits[k]}
  evals = [r["instruction"] for k in ("help_eval", "harm_eval", "hon_eval") for r in all_splits[k]]
  for name, field in (("harmbench", "behavior"), ("strongreject", "forbidden_prompt"),
                      ("donotanswer", "prompt"), ("advbench", "goal"), ("xstest_prompts", "prompt")):
    evals += sources.load_source(name, data_root)[field]
  assert not sft & {_norm(t) for t in evals}


def test_bad_arguments(data_root):
  with pytest.raises(ValueError, match="split must be 'train' or 'eval', got 'test'"):
    splits.honesty("test", data_root)
  with pytest.raises(ValueError, match="rule must be 'hash' or 'paper'"):
    splits.honesty("train", data_root, rule="first")
  with pytest.raises(ValueError, match="unknown axis 'helpfulness'"):
    splits.axis_split("helpfulness", "train", data_root)
  with pytest.raises(ValueError, match="not an HH-RLHF dialogue prefix"):
    splits.hh_messages("Human: hi")


def test_hh_messages_hand_case():
  p = "\n\nHuman: hi\n\nAssistant: hello\n\nAssistant:  more\n\nHuman: why?\n\nAssistant:"
  assert splits.hh_messages(p) == [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "hello\n\nmore"},
                                   {"role": "user", "content": "why?"}]
  assert splits.hh_instruction(p) == p[:-len("\n\nAssistant:")].strip()
  assert splits.hh_instruction("\n\nHuman: a b\n\nAssistant:") == "a b"


def test_refusals_are_deterministic_template_replies_disjoint_from_every_eval_set(data_root):
  from h3jax.evaluation import harm
  train, held = splits.refusals("train", data_root), splits.refusals("eval", data_root)
  assert (len(train), len(held)) == (260, 39)  # data README: refusal_direction harmful 260 / 39
  assert {r["task"] for r in train} == {splits.HARMLESS}
  for r in train[:20]:  # the template is picked by the instruction's hash bucket
    assert r["response"] == splits.REFUSAL_TEMPLATES[readme_bucket(r["instruction"]) % len(splits.REFUSAL_TEMPLATES)]
  assert len({r["response"] for r in train}) == len(splits.REFUSAL_TEMPLATES)  # every template is used
  norm = harm._norm
  trained = {norm(r["instruction"]) for r in train}
  for name, items in harm.load_sets(data_root).items():  # AdvBench drops its 117 trained goals
    assert not trained & {norm(x["prompt"]) for x in items}, name
  assert len(harm.advbench(data_root, drop_trained=False)) - len(harm.advbench(data_root)) == 117
