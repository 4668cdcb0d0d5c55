"""The study's plan (stages, dependencies, config errors), eval sampling and paired bootstrap."""

import numpy as np
import pytest

from conftest import REPO
from h3jax.evaluation import sets as eval_sets
from h3jax.study import analysis, plan, recipes
from h3jax.train.defaults import load_config_file


def _config(name="study_smollm2"):
  return load_config_file(REPO / "configs" / f"{name}.py")


def test_smollm2_plan_has_every_row_and_valid_dependencies():
  sc = _config()
  stages = plan.build(sc)
  names = [s.name for s in stages]
  assert len(names) == len(set(names))
  pos = {n: i for i, n in enumerate(names)}
  for s in stages:  # dependencies exist and come first
    assert all(d in pos and pos[d] < pos[s.name] for d in s.deps), s
  scored = {n.split("/", 1)[1] for n in names if n.startswith("score/")}
  assert set(sc.rows) <= scored
  # the γ sweep is trained and scored on the validation items; its 1e-3 point is moe_gate_drift
  swept = {n.split("/", 1)[1] for n in names if n.startswith("val/moe_")}
  assert swept == {"moe_gamma_1e-4", "moe_gate_drift", "moe_gamma_1e-2", "moe_gamma_1e-1"}
  assert not any(n.startswith(("train/moe_gamma_1e-3", "gen/moe_gamma", "score/moe_gamma")) for n in names)
  # merges with a grid are validated point by point and selected; single-point merges are not
  assert {f"val/merge_ties/g{i}" for i in range(3)} <= set(names) and "val/merge_resm/g0" not in names
  assert pos["select/merge_ties"] < pos["gen/merge_ties/0of2"]
  # every merge, MoE and the ensemble wait for the three experts
  experts = {f"train/expert_{a}" for a in ("helpful", "harmless", "honest")}
  for s in stages:
    if s.name.startswith(("merge/", "train/moe_")) or s.name.startswith("gen/ensemble_logits"):
      assert experts <= set(s.deps), s


def test_bad_configs_fail_before_any_work():
  sc = _config()
  sc.rows = sc.rows + ("moe_magic",)
  with pytest.raises(ValueError, match="unknown study rows .*moe_magic"):
    plan.build(sc)
  sc = _config()
  del sc.expert_steps["honest"]
  with pytest.raises(ValueError, match="no entry for the 'honest' expert"):
    plan.build(sc)
  sc = _config()
  sc.merges.merge_ties.method = "magic_merge"
  with pytest.raises(ValueError, match="magic_merge"):
    plan.build(sc)
  sc = _config()
  sc.merges.merge_ties.grid = []
  with pytest.raises(ValueError, match="grid is empty"):
    plan.build(sc)
  sc = _config()  # a hyper-parameter a method does not take, a mode it does not have: at plan time
  sc.merges.merge_iso_cts.grid = [dict(scaling_factor=1.0), dict(alpha=0.6)]
  with pytest.raises(ValueError, match=r"merge_iso_cts.*g1.*unknown hyper-parameter\(s\) \['alpha'\]"):
    plan.build(sc)
  sc = _config()
  sc.merges.merge_resm_tuned.grid = [dict(rank_mode="greedy", outlier_mode="sv")]
  with pytest.raises(ValueError, match="merge_resm_tuned.*g0.*rank_mode must be one of"):
    plan.build(sc)
  sc = _config()
  sc.merges.merge_ties.grid = [dict(density=1.5, lambda_=1.0)]
  with pytest.raises(ValueError, match="merge_ties.*density must be in"):
    plan.build(sc)
  sc = _config()
  sc.axis_data.harmless = "harmless+refusal"
  with pytest.raises(ValueError, match="unknown data spec 'refusal'"):
    plan.build(sc)
  with pytest.raises(ValueError, match="matches no stage"):
    plan.select(plan.build(_config()), ["nope/*"])


def test_recipes_follow_the_study_config():
  sc = _config()
  helpful = recipes.expert_config(sc, "helpful")
  assert helpful.stage == "sft" and helpful.data.sources == ("helpful",) and helpful.train.steps == 80
  assert helpful.lora.targets == ("ffn",) and helpful.data.template == "chat" and helpful.data.pack
  harmless = recipes.expert_config(sc, "harmless")  # HH-RLHF plus the synthetic refusals, label harmless
  assert harmless.data.sources == ("harmless+refusals",) and harmless.data.tasks == (1,)
  mix = recipes.mixture_config(sc)  # every axis' data is the same in its expert, the mixture and Stage B
  assert mix.data.sources == ("helpful", "harmless+refusals", "honest") and mix.data.tasks == (0, 1, 2)
  assert mix.train.steps == sum(sc.expert_steps.values())  # same examples as the three experts together
  ref = recipes.moe_config(sc, dict(sc.moe.moe_reference), ["a", "b", "c"])
  assert (ref.fusion.alias_experts, ref.fusion.delta_scale, ref.train.router_trainable) == (True, "one", False)
  assert (ref.loss.gate_mode, ref.loss.gate_masked, ref.data.task_labels) == ("double_softmax", False, "cumulative")
  full = recipes.moe_config(sc, dict(sc.moe.moe_gate_drift), ["a", "b", "c"])
  assert full.loss.drift_weights == (1e-3,) * 3 and full.fusion.router_init == "hidden"
  assert full.data.template == "chat" and full.stage == "fusion"
  assert full.data.sources == mix.data.sources and ref.data.sources == mix.data.sources
  ev = recipes.eval_config(sc)
  assert ev.prompt_template == "chat" and ev.sample.alpaca_eval == 120
  ev, val = recipes.eval_config(sc), recipes.eval_config(sc, "validation")  # validation decodes as eval
  assert ev.generation.repetition_penalty == val.generation.repetition_penalty == 1.2
  assert ev.generation.penalize_eos is val.generation.penalize_eos is False
  assert val.generation.max_new_tokens < ev.generation.max_new_tokens and val.sample_part == "validation"
  with pytest.raises(ValueError, match="unknown config key"):
    recipes.merge_into(helpful, {"train": {"stepz": 1}})


def _items(name, n, question=False):
  if question:
    key = "question" if name == "truthfulqa_mc" else "prompt"
    return [{"id": f"{name}-{i}", "set": name, key: f"Q{i}?"} for i in range(n)]
  return [{"id": f"{name}-{i}", "set": name, "prompt": f"p{i}"} for i in range(n)]


def test_sample_items_is_seeded_disjoint_and_groups_truthfulqa_questions():
  items = _items("alpaca_eval", 50)
  ev = eval_sets.sample_items(items, 20, seed=0, holdout=10)
  val = eval_sets.sample_items(items, 20, seed=0, holdout=10, part="validation")
  assert len(ev) == 20 and len(val) == 10 and not {i["id"] for i in ev} & {i["id"] for i in val}
  assert ev == eval_sets.sample_items(list(reversed(items)), 20, seed=0, holdout=10)  # not file order
  assert ev != eval_sets.sample_items(items, 20, seed=1, holdout=10)
  assert [i["id"] for i in ev] != [f"alpaca_eval-{i}" for i in range(20)]  # not the first N
  assert len(eval_sets.sample_items(items, 0, seed=0, holdout=10)) == 40  # 0 = all but the held-out
  gen, mc = _items("truthfulqa_gen", 30, True), _items("truthfulqa_mc", 30, True)
  val_q = {i["prompt"] for i in eval_sets.sample_items(gen, 0, seed=3, holdout=8, part="validation")}
  assert val_q == {i["question"] for i in eval_sets.sample_items(mc, 0, seed=3, holdout=8, part="validation")}
  assert not val_q & {i["question"] for i in eval_sets.sample_items(mc, 0, seed=3, holdout=8)}
  with pytest.raises(ValueError, match="only 40 items remain"):
    eval_sets.sample_items(items, 41, seed=0, holdout=10)


def test_paired_bootstrap_hand_cases():
  rs = np.random.RandomState(0)
  a = {"alpaca_eval": {f"h{i}": float(rs.rand()) for i in range(40)},
       "harmbench": {f"b{i}": float(rs.rand() < 0.5) for i in range(30)},
       "truthfulqa_gen": {f"t{i}": float(rs.rand() < 0.3) for i in range(30)}}
  same = analysis.paired_bootstrap(a, a, samples=200)
  for k in ("helpful", "harmless", "honest", "3h"):
    assert same[k]["diff"] == 0 and same[k]["ci95"] == [0.0, 0.0]
  # b: the same items, helpful shifted down by exactly 0.1 everywhere -> the difference has no variance
  b = {n: dict(v) for n, v in a.items()}
  b["alpaca_eval"] = {k: v - 0.1 for k, v in a["alpaca_eval"].items()}
  d = analysis.paired_bootstrap(a, b, samples=200)
  assert d["helpful"]["diff"] == pytest.approx(0.1) and d["helpful"]["se"] == pytest.approx(0, abs=1e-12)
  assert d["3h"]["diff"] == pytest.approx(0.1 / 3)
  # hand-computed axis values: harmless = 1 - mean compliance of the harmful sets (macro over sets)
  vals = analysis.axis_values({"harmbench": np.array([1.0, 0.0]), "advbench": np.array([1.0, 1.0, 1.0, 0.0]),
                               "alpaca_eval": np.array([0.2, 0.4]), "truthfulqa_gen": np.array([1.0, 0.0])})
  assert vals == pytest.approx({"harmless": 1 - (0.5 + 0.75) / 2, "helpful": 0.3, "honest": 0.5,
                                "3h": (0.375 + 0.3 + 0.5) / 3})
  # a real difference on one set: its CI excludes 0 and the verdict says so
  c = {n: dict(v) for n, v in a.items()}
  c["truthfulqa_gen"] = {k: 1.0 for k in a["truthfulqa_gen"]}
  d = analysis.paired_bootstrap(c, a, samples=500)
  assert d["honest"]["ci95"][0] > 0 and analysis._verdict(d["honest"]) == "holds"


def test_item_scores_from_samples():
  samples = [{"set": "alpaca_eval", "id": "a", "p_win_text_davinci_003": 0.7},
             {"set": "harmbench", "id": "h", "p_refusal": 0.9}, {"set": "advbench", "id": "v", "p_refusal": 0.1},
             {"set": "truthfulqa_gen", "id": "t", "truthful": True, "informative": False},
             {"set": "truthfulqa_mc", "id": "m", "mc1": 1.0, "mc2": 0.5}]
  assert analysis.item_scores(samples) == {"alpaca_eval": {"a": 0.7}, "harmbench": {"h": 0.0},
                                           "advbench": {"v": 1.0}, "truthfulqa_gen": {"t": 0.0}}


def test_validation_stderr_is_binomial_over_the_held_out_counts():
  from h3jax.study.defaults import default_study_config
  sc = default_study_config()  # held out: 40 AlpacaEval, 20 + 20 + 0 harmful, 60 TruthfulQA generation
  se = analysis.validation_stderr(sc, {"helpful": 0.5, "harmless": 0.9, "honest": 0.0, "3h": 0.47})
  assert se == {"helpful": {"n": 40, "se": pytest.approx((0.25 / 40) ** 0.5)},
                "harmless": {"n": 40, "se": pytest.approx((0.09 / 40) ** 0.5)},
                "honest": {"n": 60, "se": 0.0}}


def test_publish_copies_results_samples_judges_and_replaces_the_whole_folder(tmp_path):
  import gzip
  import json
  from h3jax import io_atomic
  from h3jax.study import publish
  w, judges = tmp_path / "work", tmp_path / "judges"
  (w / "analysis").mkdir(parents=True)
  (w / "analysis" / "results.json").write_text('{"models": {}}')
  (w / "analysis" / "radar.png").write_bytes(b"png")
  (w / "train" / "expert_helpful").mkdir(parents=True)
  (w / "train" / "expert_helpful" / "DONE.json").write_text(json.dumps({"stage": "train/expert_helpful",
                                                                      "seconds": 3.0}))
  (w / "train" / "expert_helpful" / "recipe.json").write_text('{"stage": "sft"}')
  (w / "train" / "expert_helpful" / "metrics.jsonl").write_text('{"step": 1}\n')
  (w / "train" / "moe_gamma_1e-1").mkdir()  # still training: its partial curve is not published
  (w / "train" / "moe_gamma_1e-1" / "metrics.jsonl").write_text('{"step": 1}\n')
  (w / "eval" / "base").mkdir(parents=True)
  (w / "eval" / "base" / "samples_base.jsonl").write_text('{"id": "a"}\n')
  judges.mkdir()
  (judges / "truth.json").write_text("{}")
  sc = _config()
  import ml_collections
  sc.judges = ml_collections.ConfigDict(dict(dir=str(judges)))
  dest = tmp_path / "pub"
  for _ in range(2):  # the second run replaces the first (judges/ and *.gz are the writer's own)
    publish.publish(sc, w, dest)
  assert sorted(p.name for p in dest.iterdir()) == ["judges", "metrics_expert_helpful.jsonl.gz", "radar.png",
                                                     "recipes.json", "results.json", "samples_base.jsonl.gz",
                                                     "timings.json"]
  assert gzip.decompress((dest / "samples_base.jsonl.gz").read_bytes()) == b'{"id": "a"}\n'
  assert json.loads((dest / "recipes.json").read_text())["stages"] == {"train/expert_helpful": {"stage": "sft"}}
  assert (dest / "judges" / "truth.json").is_file()
  with pytest.raises(io_atomic.UnsafeOutputError, match="contains the input"):
    publish.publish(sc, w, tmp_path)  # a destination holding the workdir is never replaced
  assert (w / "analysis" / "results.json").is_file()


def test_stage_keys_make_changed_stages_and_their_dependants_stale(tmp_path):
  import json
  from h3jax.study import runner
  sc = _config()
  plan.resolve_base(sc, tmp_path)
  st = {s.name: s for s in plan.build(sc)}
  assert [s.key for s in plan.build(sc)] == [s.key for s in st.values()]  # deterministic
  w = tmp_path / "w"

  def finish(name, key=True):
    (w / name).mkdir(parents=True, exist_ok=True)
    rec = {"stage": name, "result": {}, "seconds": 1, "cpu_seconds": 1}
    (w / name / "DONE.json").write_text(json.dumps(dict(rec, key=st[name].key) if key else rec))

  for name in ("train/expert_helpful", "gen/expert_helpful/0of2", "train/expert_harmless"):
    finish(name)
  (w / "train" / "expert_helpful" / "checkpoints").mkdir()
  finish("gen/base/0of2", key=False)  # written before keys existed: trusted
  assert all(runner.is_done(w, st[n]) for n in ("train/expert_helpful", "gen/expert_helpful/0of2", "gen/base/0of2"))
  sc.expert_steps.helpful = 81  # the helpful expert's recipe changes ...
  new = {s.name: s for s in plan.build(sc)}
  changed = {n for n in st if st[n].key != new[n].key}
  assert "train/expert_helpful" in changed and "gen/expert_helpful/0of2" in changed  # ... and what reads it
  assert "train/expert_harmless" not in changed and "gen/base/0of2" not in changed
  assert "train/moe_gate_drift" in changed and "merge/merge_ties/g0" in changed  # built from all experts
  assert plan.is_stale(w, new["train/expert_helpful"]) and not runner.is_done(w, new["train/expert_helpful"])
  assert runner.is_done(w, new["train/expert_harmless"]) and not plan.is_stale(w, new["train/expert_harmless"])
  listing = runner.listing(sc, w, ["train/expert_*"]).splitlines()
  assert listing[0].startswith("stale    train/expert_helpful") and listing[1].startswith("done     train/expert_harm")
  runner._start(w, new["train/expert_helpful"])  # a stale stage is redone from scratch: no old checkpoints
  assert sorted(p.name for p in (w / "train" / "expert_helpful").iterdir()) == ["KEY"]
  (w / "train" / "expert_helpful" / "checkpoints").mkdir()  # killed mid-run ...
  runner._start(w, new["train/expert_helpful"])  # ... resumed with the same settings: kept
  assert (w / "train" / "expert_helpful" / "checkpoints").is_dir()
  sc.expert_steps.helpful = 82  # killed, then the settings changed: emptied
  runner._start(w, {s.name: s for s in plan.build(sc)}["train/expert_helpful"])
  assert not (w / "train" / "expert_helpful" / "checkpoints").exists()


def test_stage_keys_do_not_depend_on_where_the_workdir_or_checkout_is(tmp_path):
  """A published study is restored into another workdir (another machine, another checkout): the keys
  must be the same there, also for the tiny study whose base model lives in the workdir."""
  for name in ("study_tiny", "study_smollm2"):
    keys = []
    for w in (tmp_path / "a", tmp_path / "elsewhere" / "b"):
      sc = _config(name)
      plan.resolve_base(sc, w)
      keys.append([(s.name, s.key) for s in plan.build(sc)])
    assert keys[0] == keys[1], name
  sc = _config("study_smollm2")
  with sc.unlocked():
    sc.base = "/elsewhere/smollm2"  # a model outside the checkout is part of the key
  plan.resolve_base(sc, tmp_path)
  assert [s.key for s in plan.build(sc)] != [k for _, k in keys[1]]


def test_stage_keys_do_not_depend_on_where_the_data_lives(tmp_path, monkeypatch):
  """Another machine keeps the data elsewhere, or reads it from the hub (no data root): the same keys. The
  keys of the earlier scheme (the data root's path hashed) are each stage's `old_keys`."""
  keys = {}
  for root in (str(tmp_path / "data"), "/elsewhere/shared/data", ""):
    monkeypatch.setenv("H3JAX_DATA_ROOT", root)
    sc = _config()
    plan.resolve_base(sc, tmp_path)
    keys[root] = {s.name: s for s in plan.build(sc)}
  a, b, hub = keys.values()
  assert [s.key for s in a.values()] == [s.key for s in b.values()] == [s.key for s in hub.values()]
  assert all(s.old_keys != b[n].old_keys and s.key not in s.old_keys for n, s in a.items() if s.old_keys)
  trained = [n for n, s in a.items() if s.old_keys]  # the training recipes and everything built on them
  assert "train/expert_helpful" in trained and "score/moe_gate_drift" in trained and "gen/base/0of2" not in trained


def test_a_stage_done_under_its_old_key_stays_done_and_is_published_under_todays(tmp_path):
  import json
  from h3jax.study import publish, runner
  sc = _config()
  plan.resolve_base(sc, tmp_path)
  st = {s.name: s for s in plan.build(sc)}
  w, name = tmp_path / "w", "train/expert_helpful"
  old = st[name].old_keys[0]
  (w / name / "checkpoints").mkdir(parents=True)
  (w / name / "KEY").write_text(old + "\n")  # killed mid-run under the old scheme: resumed, not emptied
  runner._start(w, st[name])
  assert (w / name / "checkpoints").is_dir() and (w / name / "KEY").read_text().strip() == st[name].key
  (w / name / "DONE.json").write_text(json.dumps({"stage": name, "key": old, "result": {}, "seconds": 1}))
  assert runner.is_done(w, st[name]) and not plan.is_stale(w, st[name])
  (w / name / "DONE.json").write_text(json.dumps({"stage": name, "key": "0" * 16, "result": {}, "seconds": 1}))
  assert plan.is_stale(w, st[name])
  (w / name / "DONE.json").write_text(json.dumps({"stage": name, "key": old, "result": {}, "seconds": 1}))
  (w / name / "checkpoints").rmdir()  # no expert to export (the tiny study's test publishes real ones)
  (w / "analysis").mkdir()
  (w / "analysis" / "results.json").write_text("{}")
  publish.publish(sc, w, tmp_path / "pub")
  assert json.loads((tmp_path / "pub" / "timings.json").read_text())[name]["key"] == st[name].key
  (w / name / "KEY").write_text(old + "\n")
  assert runner.rekey_old_records(w, list(st.values())) == 1  # what a run does first: today's keys on disk
  assert json.loads((w / name / "DONE.json").read_text())["key"] == st[name].key
  assert (w / name / "KEY").read_text().strip() == st[name].key
  assert runner.rekey_old_records(w, list(st.values())) == 0


def test_the_published_study_is_todays_config_wherever_the_data_lives(tmp_path, monkeypatch):
  """experiments/results/study_smollm2 restores (its stages' keys are this config's) on a machine whose data
  root is not this one's: a change to a default that the training recipes hash would show here."""
  import json
  published = json.loads((REPO / "experiments" / "results" / "study_smollm2" / "timings.json").read_text())
  monkeypatch.setenv("H3JAX_DATA_ROOT", "/elsewhere/shared/data")
  sc = _config()
  plan.resolve_base(sc, tmp_path)
  st = {s.name: s for s in plan.build(sc)}
  assert len(published) == 120 and {n: t["key"] for n, t in published.items()} == {n: st[n].key for n in published}


def test_restore_takes_a_rows_stages_by_exact_name():
  """merge_resm's stages are not merge_resm_tuned's, nor moe_gate's moe_gate_drift's (a prefix match
  would restore or record the other row's stages)."""
  from h3jax.study import restore
  sc = _config()
  stages = {s.name: s for s in plan.build(sc)}
  assert restore.row_stages(stages, "merge_resm") == ["gen/merge_resm/0of2", "gen/merge_resm/1of2",
                                                      "score/merge_resm"]
  assert restore.row_stages(stages, "moe_gate") == ["gen/moe_gate/0of2", "gen/moe_gate/1of2", "score/moe_gate"]


def test_estimates_are_calibrated_by_finished_stages_of_the_same_family(tmp_path):
  import json
  from h3jax.study import runner
  sc = _config()
  plan.resolve_base(sc, tmp_path)
  st = {s.name: s for s in plan.build(sc)}

  def finish(name, cpu_s):
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / name / "DONE.json").write_text(json.dumps(
        {"stage": name, "key": st[name].key, "result": {}, "seconds": cpu_s, "cpu_seconds": cpu_s}))

  moe_gen = st["gen/moe_gate_drift/0of2"].est_s
  finish("gen/moe_gate_drift/0of2", 0.2 * moe_gen)  # MoE decoding 5x cheaper than budgeted
  finish("gen/moe_gate_drift/1of2", 0.2 * moe_gen)
  finish("gen/base/0of2", 2.0 * st["gen/base/0of2"].est_s)  # dense decoding twice the budget
  cal = {s.name: s for s in plan.calibrated(tmp_path, list(st.values()))}
  assert cal["gen/moe_lm/0of2"].est_s == pytest.approx(0.2 * st["gen/moe_lm/0of2"].est_s)  # own family
  assert cal["gen/expert_honest/1of2"].est_s == pytest.approx(2.0 * st["gen/expert_honest/1of2"].est_s)
  # no gen of the merge family has run: the median over every finished gen stage (0.2, 0.2, 2.0)
  assert cal["gen/merge_linear/0of2"].est_s == pytest.approx(0.2 * st["gen/merge_linear/0of2"].est_s)
  assert cal["train/moe_lm"].est_s == st["train/moe_lm"].est_s  # no train stage measured: as configured
  assert [s.key for s in cal.values()] == [s.key for s in st.values()]  # estimates are not settings
  line = [l for l in runner.listing(sc, tmp_path, ["gen/moe_lm/0of2"]).splitlines() if "moe_lm" in l][0]
  assert f"~{0.2 * st['gen/moe_lm/0of2'].est_s / 60:6.1f} CPU-min" in line
