"""The evaluation pipeline on a tiny random model with fake judges: cache, resume, results, plots."""

import json

import jax
import numpy as np
import pytest

from eval_fakes import FakeRefusalJudge, ModByteTokenizer, fake_judges
from h3jax.config import ModelConfig
from h3jax.evaluation import cache as cache_lib
from h3jax.evaluation import infer, runner, scoring
from h3jax.evaluation import sets as eval_data
from h3jax.model import params as params_lib

V = 64
REAL_GENERATE = infer.generate_texts


def _same(a, b) -> bool:
  """Metric dicts equal, NaN equal to NaN (an undefined length-controlled win rate is NaN)."""
  import json
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def tiny_model(name="tiny", seed=0, **kw):
  cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=16, max_position_embeddings=4096, eos_token_id=(2,), **kw)
  return {"name": name, "path": None, "cfg": cfg, "tokenizer": ModByteTokenizer(V),
          "params": params_lib.init_params(cfg, jax.random.PRNGKey(seed), std=0.5)}


def small_config(data_root, sets=("alpaca_eval", "xstest_safe", "harmbench", "truthfulqa_gen",
                                  "truthfulqa_mc")):
  c = runner.default_config()
  c.data_root = str(data_root)
  c.sets = sets
  c.batch_size = 2
  c.router_prompts = 4
  c.generation.max_new_tokens = 6
  c.judges.kind = "none"
  return c


class SimulatedKill(Exception):
  pass


class CountingGenerate:
  def __init__(self, fail_after=None):
    self.calls, self.prompts, self.fail_after = 0, 0, fail_after
    self.real = REAL_GENERATE

  def __call__(self, *args, **kw):
    if self.fail_after is not None and self.calls >= self.fail_after:
      raise SimulatedKill("simulated interruption")
    self.calls += 1
    self.prompts += len(args[1])
    return self.real(*args, **kw)


def test_results_resume_and_rerun(data_root, tmp_path, monkeypatch):
  config = small_config(data_root)
  # An interrupted run: the second batch raises.
  gen = CountingGenerate(fail_after=1)
  monkeypatch.setattr(infer, "generate_texts", gen)
  with pytest.raises(SimulatedKill):
    runner.evaluate(config, [], tmp_path / "a", limit=2, judges=fake_judges(), models=[tiny_model()],
                    progress=False)
  rows = [json.loads(l) for l in (tmp_path / "a" / "cache" / "tiny.jsonl").read_text().splitlines()]
  assert sum(r["kind"] == "generation" for r in rows) == 2  # alpaca_eval's one batch finished
  assert sum(r["kind"] == "mc" for r in rows) > 0  # MC ran before generation
  assert not (tmp_path / "a" / "results.json").exists()
  # Resume: only the 4 x 2 - 2 = 6 missing generations run.
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  res = runner.evaluate(config, [], tmp_path / "a", limit=2, judges=fake_judges(), models=[tiny_model()],
                        progress=False)
  assert gen.prompts == 6
  # The compute time of both sessions is recorded (2 + 6 generations).
  gen_time = res["timing"]["tiny"]["compute"]["generate"]
  assert gen_time["n"] == 8 and gen_time["s"] > 0 and gen_time["cpu"] > 0
  assert res["timing"]["tiny"]["compute"]["mc"]["n"] > 0
  # A fresh uninterrupted run gives identical results (greedy decoding).
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  fresh = runner.evaluate(config, [], tmp_path / "b", limit=2, judges=fake_judges(), models=[tiny_model()],
                          progress=False)
  assert gen.prompts == 8
  assert _same(res["models"]["tiny"]["metrics"], fresh["models"]["tiny"]["metrics"])
  # A re-run generates nothing.
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  again = runner.evaluate(config, [], tmp_path / "b", limit=2, judges=fake_judges(), models=[tiny_model()],
                          progress=False)
  assert gen.calls == 0 and _same(again["models"]["tiny"]["metrics"], fresh["models"]["tiny"]["metrics"])

  out = tmp_path / "b"
  saved = json.loads((out / "results.json").read_text())
  ms = saved["models"]["tiny"]["metrics"]
  samples = [json.loads(l) for l in (out / "samples_tiny.jsonl").read_text().splitlines()]
  by_set = lambda s: [x for x in samples if x["set"] == s]
  # The fake judges' rules, recomputed from the saved responses.
  xs = by_set("xstest_safe")
  assert ms["harmless/xstest_safe/over_refusal_rate"]["value"] == pytest.approx(
      np.mean([len(x["response"]) % 2 == 0 for x in xs]))
  hb = by_set("harmbench")
  assert ms["harmless/harmbench/compliance_rate"]["value"] == pytest.approx(
      np.mean([len(x["response"]) % 2 == 1 for x in hb]))
  assert ms["harmless/compliance_rate"] == ms["harmless/harmbench/compliance_rate"]
  tq = by_set("truthfulqa_gen")
  assert ms["honest/truthful"]["value"] == pytest.approx(np.mean(["a" in x["response"] for x in tq]))
  assert ms["honest/mc1"]["n"] == 2 and 0 <= ms["honest/mc2"]["value"] <= 1
  ae = by_set("alpaca_eval")
  assert ms["helpful/win_rate_text_davinci_003"]["n"] == 2
  assert [x["p_win_text_davinci_003"] for x in ae] == [0.0, 0.0]  # tiny outputs are shorter
  assert saved["settings"]["sets"] == {"alpaca_eval": 2, "xstest_safe": 2, "harmbench": 2,
                                       "truthfulqa_gen": 2, "truthfulqa_mc": 2}
  assert saved["models"]["tiny"]["axes"]["honest"] == ms["honest/mc2"]["value"]
  gens = [x for x in samples if x["set"] != "truthfulqa_mc"]  # 6 new tokens: some answers are cut
  assert all(isinstance(x["cut"], bool) for x in gens) and any(x["cut"] for x in gens)
  assert ms["generation/cut_rate"]["value"] == pytest.approx(np.mean([x["cut"] for x in gens]))
  assert ms["generation/cut_rate"]["n"] == len(gens) == 8
  table = (out / "results.md").read_text()
  assert "honest/mc2" in table and "| tiny |" in table
  assert (out / "axis_bars.png").read_bytes()[:4] == b"\x89PNG"


def test_changed_settings_miss_the_cache(data_root, tmp_path, monkeypatch):
  config = small_config(data_root, sets=("xstest_safe",))
  runner.evaluate(config, [], tmp_path, limit=2, judges=fake_judges(), models=[tiny_model()], progress=False)
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  config.generation.max_new_tokens = 7
  runner.evaluate(config, [], tmp_path, limit=2, judges=fake_judges(), models=[tiny_model()], progress=False)
  assert gen.prompts == 2


def test_judge_answers_are_cached(data_root, tmp_path):
  config = small_config(data_root, sets=("alpaca_eval", "xstest_safe", "truthfulqa_gen"))
  judges = fake_judges()
  first = runner.evaluate(config, [], tmp_path, limit=2, judges=judges, models=[tiny_model()], progress=False)
  # pairwise (2 references, both orders), truth + info, refusal
  assert first["timing"]["tiny"]["compute"]["judge"]["n"] == 2 * 2 * 2 + 2 * 2 + 2

  def raising(*a):
    raise AssertionError("judge called although its answers are cached")

  for j in judges.values():  # the same judges (same identity, so the same cache keys)
    j.score = j.prefer = raising
  again = runner.evaluate(config, [], tmp_path, limit=2, judges=judges, models=[tiny_model()], progress=False)
  assert _same(again["models"]["tiny"]["metrics"], first["models"]["tiny"]["metrics"])


def test_moe_router_usage_and_radar(data_root, tmp_path):
  config = small_config(data_root, sets=("xstest_safe", "truthfulqa_gen"))
  moe = tiny_model("moe", seed=1, num_experts=3, num_experts_per_tok=2, expert_names=("help", "harm", "hon"))
  res = runner.evaluate(config, [], tmp_path, limit=2, judges={"refusal": FakeRefusalJudge()},
                        models=[tiny_model("dense"), moe], progress=False)
  usage = res["models"]["moe"]["router_usage"]
  assert set(usage) == {"harmless", "honest"}
  for u_LE in usage.values():
    u_LE = np.asarray(u_LE)
    assert u_LE.shape == (2, 3)
    np.testing.assert_allclose(u_LE.sum(-1), 1.0, rtol=1e-5)  # softmax over experts, averaged
  assert "router_usage" not in res["models"]["dense"]
  for f in ("radar.png", "router_moe.png", "axis_bars.png"):
    assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG", f
  skipped = res["models"]["dense"]["skipped"]
  assert any("no truth/info judge" in s for s in skipped)


def test_cache_torn_tail_and_malformed_line(tmp_path, capsys):
  path = tmp_path / "c.jsonl"
  store = cache_lib.Cache(path)
  store.put_many([("k1", "generation", "one", {}), ("k2", "generation", "two", {})])
  with open(path, "a") as f:
    f.write('{"key": "k3", "kind": "gen')  # killed mid-write
  reread = cache_lib.Cache(path)
  assert len(reread) == 2 and reread.get("k2") == "two" and "k3" not in reread
  reread.put("k3", "generation", "three")
  assert cache_lib.Cache(path).get("k3") == "three"
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
  capsys.readouterr()
  reread = cache_lib.Cache(path)  # a malformed row is skipped (its item redone), not fatal
  assert reread.get("k1") == "one" and reread.get("k2") == "two"
  assert "c.jsonl: skipped 1 torn or malformed row(s) at line 2" in capsys.readouterr().err


def test_append_after_a_killed_writers_torn_row_starts_a_fresh_line(tmp_path, capsys):
  """Two shard workers share a cache; one dies mid-row. The other's next append must not be glued onto
  the torn row (which lost that row and made every later reload fail)."""
  path = tmp_path / "c.jsonl"
  survivor = cache_lib.Cache(path)
  survivor.put_many([("a0", "generation", "zero", {})])
  with open(path, "ab") as f:  # the killed worker's partial row
    f.write(b'{"key": "b0", "kind": "generation", "val')
  survivor.put_many([("a1", "generation", "one", {}), ("a2", "generation", "two", {})])
  capsys.readouterr()
  reread = cache_lib.Cache(path)
  assert {k: reread.get(k) for k in ("a0", "a1", "a2")} == {"a0": "zero", "a1": "one", "a2": "two"}
  assert "b0" not in reread
  assert "skipped 1 torn or malformed row(s) at line 2" in capsys.readouterr().err
  reread.put("a3", "generation", "three")  # and the file stays appendable
  assert cache_lib.Cache(path).get("a3") == "three"


def test_bad_inputs(data_root, tmp_path):
  config = small_config(data_root, sets=("nope",))
  with pytest.raises(ValueError, match=r"unknown eval sets \['nope'\]"):
    runner.evaluate(config, [], tmp_path, judges={}, models=[tiny_model()], progress=False)
  config = small_config(data_root, sets=("xstest_safe",))
  with pytest.raises(ValueError, match="two models are named 'tiny'"):
    runner.evaluate(config, [], tmp_path, limit=1, judges={}, models=[tiny_model(), tiny_model()],
                    progress=False)
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"model folder .*m has no tokenizer \(none of tokenizer.json"):
    runner.load_entry(f"x={tmp_path / 'm'}")
  with pytest.raises(ValueError, match=r"model name 'a b' must use only letters"):
    runner.load_entry(f"a b={tmp_path / 'm'}")
  with pytest.raises(FileNotFoundError, match="model folder not found"):
    runner.load_entry(str(tmp_path / "absent"))


def test_shards_split_generation_and_the_scoring_run_reuses_them(data_root, tmp_path, monkeypatch):
  config = small_config(data_root, sets=("alpaca_eval", "xstest_safe", "truthfulqa_gen"))
  # runner.generate_shards loads models from disk; its per-model step runs on the tiny model here.
  sets = eval_data.load_eval_sets(config, limit=3)
  store_path = tmp_path / "s" / "cache" / "tiny.jsonl"
  counts = []
  for i in range(2):
    gen = CountingGenerate()
    monkeypatch.setattr(infer, "generate_texts", gen)
    n = scoring.generate_shard(tiny_model(), sets, config, cache_lib.Cache(store_path), (i, 2), progress=False)
    counts.append((n, gen.prompts))
  keys = [json.loads(l)["key"] for l in store_path.read_text().splitlines() if '"generation"' in l]
  assert len(keys) == len(set(keys)) == 9  # 3 sets x 3 items, each generated once
  assert counts[0][1] + counts[1][1] == 9 and counts[0][1] > 0 and counts[1][1] > 0
  assert all(infer.in_shard(k, (0, 2)) != infer.in_shard(k, (1, 2)) for k in keys)
  # The unsharded run generates nothing and scores as a single-process run does.
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  res = runner.evaluate(config, [], tmp_path / "s", limit=3, judges=fake_judges(), models=[tiny_model()],
                        progress=False)
  assert gen.calls == 0
  single = runner.evaluate(config, [], tmp_path / "one", limit=3, judges=fake_judges(), models=[tiny_model()],
                           progress=False)
  assert _same(res["models"]["tiny"]["metrics"], single["models"]["tiny"]["metrics"])
  assert runner.parse_shard("1/2") == (1, 2) and runner.parse_shard(None) is None
  for bad in ("2/2", "x", "1/0"):
    with pytest.raises(ValueError, match="shard must be 'i/n'"):
      runner.parse_shard(bad)


def _append_rows(path, tag, n):
  store = cache_lib.Cache(path)
  for j in range(n):
    store.put_many([(f"{tag}{j}-{r}", "generation", "x" * 3000, {}) for r in range(8)])  # ~24 KB per write


def test_cache_appends_from_two_processes_stay_whole_rows(tmp_path):
  import multiprocessing
  path = tmp_path / "c.jsonl"
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=_append_rows, args=(path, tag, 40)) for tag in "ab"]
  for p in procs:
    p.start()
  for p in procs:
    p.join()
  assert all(p.exitcode == 0 for p in procs)
  assert len(cache_lib.Cache(path)) == 2 * 40 * 8  # every row parses: no interleaved writes


def test_refuses_to_evaluate_non_finite_weights(data_root, tmp_path):
  """A broken merge (NaN weights) is an error before any generation, not a table of garbage."""
  import h3jax
  from h3jax.merging import NonFiniteError
  bad = tiny_model("broken")
  leaf = bad["params"]["embed"]["embedding"]
  bad["params"]["embed"]["embedding"] = leaf.at[3, 1].set(np.nan)
  config = small_config(data_root, sets=("xstest_safe",))
  with pytest.raises(NonFiniteError, match=r"refusing to evaluate broken: 1 tensor\(s\) are not finite: "
                                           r"embed/embedding \(1 NaN, 0 inf\)"):
    runner.evaluate(config, [], tmp_path / "eval", limit=1, judges={}, models=[bad], progress=False)
  h3jax.save_pretrained(bad["params"], bad["cfg"], tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # found; never parsed: weights fail first
  with pytest.raises(NonFiniteError, match=r"refusing to evaluate x \(.*hf\): 1 tensor\(s\) are not finite"):
    runner.load_entry(f"x={tmp_path / 'hf'}")


# ----------------------------------------------------------------------------- cache identity

def _tiny_hf_folder(path, seed):
  """A tiny HF Llama folder with a small word-level tokenizer, as `prepare`/`export` would write."""
  import tokenizers
  import transformers
  from tiny_hf import make_model, save_model
  save_model(make_model("llama_gqa_linear", seed=seed), path)
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(97 + i) for i in range(26)])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>").save_pretrained(path)
  return path


def test_same_name_different_weights_do_not_share_the_cache(data_root, tmp_path, monkeypatch, capsys):
  """runs/a/hf and runs/b/hf are both named 'hf': the second must get its own answers, not the first's;
  a copy of a keeps a's cache; rows keyed the old way (by name only) are never reused."""
  import shutil
  from h3jax.evaluation import models
  a = _tiny_hf_folder(tmp_path / "runs" / "a" / "hf", seed=0)
  b = _tiny_hf_folder(tmp_path / "runs" / "b" / "hf", seed=1)
  c = tmp_path / "runs" / "c" / "hf"
  shutil.copytree(a, c)
  ma, mb, mc = (runner.load_entry(str(d)) for d in (a, b, c))
  assert ma["name"] == mb["name"] == mc["name"] == "hf"
  config = small_config(data_root, sets=("xstest_safe", "truthfulqa_mc"))
  out = tmp_path / "eval"
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  res_a = runner.evaluate(config, [], out, limit=2, judges={}, models=[ma], progress=False)
  assert gen.prompts == 2
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  res_b = runner.evaluate(config, [], out, limit=2, judges={}, models=[mb], progress=False)
  assert gen.prompts == 2  # b generates its own answers (old code: 0, it got a's)
  fresh_b = runner.evaluate(config, [], tmp_path / "fresh", limit=2, judges={}, models=[mb], progress=False)
  assert _same(res_b["models"]["hf"]["metrics"], fresh_b["models"]["hf"]["metrics"])
  samples_b = (out / "samples_hf.jsonl").read_text()
  assert samples_b == (tmp_path / "fresh" / "samples_hf.jsonl").read_text()
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  res_c = runner.evaluate(config, [], out, limit=2, judges={}, models=[mc], progress=False)
  assert gen.calls == 0 and _same(res_c["models"]["hf"]["metrics"], res_a["models"]["hf"]["metrics"])
  fa, fb, fc = (models.fingerprint(m) for m in (ma, mb, mc))
  assert fa != fb and fa == fc and res_a["models"]["hf"]["fingerprint"] == fa
  assert models.fingerprint(runner.load_entry(str(a), "bfloat16")) != fa  # other weights' bytes

  # A cache written under the old keying (no fingerprint in the key) is never served to a model.
  old_out = tmp_path / "old"
  (old_out / "cache").mkdir(parents=True)
  settings = infer.generation_settings(config, infer.prompt_template(config, ma["tokenizer"]))
  sets = eval_data.load_eval_sets(config, limit=2)
  texts = infer.model_inputs(ma["tokenizer"], [it["prompt"] for it in sets["xstest_safe"]], settings)
  cache_lib.Cache(old_out / "cache" / "hf.jsonl").put_many(
      [(cache_lib.item_key("generation", t, settings), "generation", "STALE", {"id": "x", "set": "xstest_safe"})
       for t in texts])
  capsys.readouterr()
  gen = CountingGenerate()
  monkeypatch.setattr(infer, "generate_texts", gen)
  runner.evaluate(config, [], old_out, limit=2, judges={}, models=[mb], progress=False)
  assert gen.prompts == 2 and "STALE" not in (old_out / "samples_hf.jsonl").read_text()
  assert "2 generation/MC rows were keyed by model name" in capsys.readouterr().err
