"""Judges: features and heads against hand computations, trained judges against their baselines,
artifact round trip, HTTP judge against a loopback stub, and clear errors."""

import http.server
import json
import math
import os
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from conftest import QUICK_JUDGES, build_quick_judges
from numerics import assert_close
from h3jax.evaluation import judges as J
from h3jax.evaluation.judges import data as data_lib
from h3jax.evaluation.judges import features as F
from h3jax.evaluation.judges import heads
from h3jax.evaluation.judges import train as train_lib

# Held-out agreement must beat each baseline by at least this much (absolute).
# FULL_MARGINS: the shipped build (all data, hyperparameter grid; optin test, ~2 CPU-min).
# MARGINS: the default test's quick build on a 40% subset of split keys (whole
# questions / prompts / instructions) with one hyperparameter setting.
FULL_MARGINS = {"refusal": {"majority_class": 0.30, "string_match": 0.04},
                "truth": {"majority_class": 0.10}, "info": {"majority_class": 0.05},
                "pairwise": {"majority_class": 0.30, "longer_wins": 0.004}}
MARGINS = {"refusal": {"majority_class": 0.30, "string_match": 0.02},
           "truth": {"majority_class": 0.08}, "info": {"majority_class": 0.03},
           "pairwise": {"majority_class": 0.30, "longer_wins": 0.0}}
QUICK = dict(fraction=QUICK_JUDGES["fraction"], grid=(heads.HeadConfig(l2=QUICK_JUDGES["l2"]),))


# ----------------------------------------------------------------------------- features / heads

def test_featurize_matches_hand_computation():
  cfg = F.FeatureConfig(fields=("r",), dim=1 << 20, ngrams=2, lead=2)
  x = F.featurize([("A b, a",)], cfg)
  h = lambda s: zlib.crc32(s.encode()) % (1 << 20)
  # tokens: a b , a -> unigrams a:2 b:1 ,:1; bigrams "a b" "b ," ", a"; lead @0 a, @1 b
  counts = {h("r|a"): 2, h("r|b"): 1, h("r|,"): 1, h("r|a b"): 1, h("r|b ,"): 1, h("r|, a"): 1,
            h("r@0|a"): 1, h("r@1|b"): 1}
  raw = {k: 1 + math.log(c) for k, c in counts.items()}
  norm = math.sqrt(sum(v * v for v in raw.values()))
  got = dict(zip(x.ids.tolist(), x.vals.tolist()))
  assert got.keys() == raw.keys()
  for k, v in raw.items():
    assert got[k] == pytest.approx(v / norm, rel=1e-6)
  assert x.dense[0, 0] == pytest.approx(math.log1p(6))  # log chars
  sub = F.featurize([("x y",), ("A b, a",)], cfg).take([1])
  assert sorted(sub.ids.tolist()) == sorted(x.ids.tolist()) and (sub.rows == 0).all()


def test_heads_learn_a_token_rule_and_bradley_terry_is_antisymmetric():
  cfg = F.FeatureConfig(fields=("r",), dim=1 << 12)
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
  texts = [" ".join(rng.choice(words, 5)) for _ in range(200)]
  y = np.asarray(["gamma" in t for t in texts], np.float32)
  x = F.featurize([(t,) for t in texts], cfg)
  p, losses = heads.train_pointwise(x, y, cfg.dim, heads.HeadConfig(steps=200, l2=0.0))
  assert losses[-1] < 0.2 * losses[0]
  assert ((heads.scores(p, x) > 0) == (y > 0.5)).mean() == 1.0
  # pairwise: the row containing "gamma" should win
  a = np.flatnonzero(y > 0.5)[:40]
  b = np.flatnonzero(y < 0.5)[:40]
  p2, _ = heads.train_pairwise(x, np.r_[a, b], np.r_[b, a], np.r_[np.ones(40), np.zeros(40)], cfg.dim,
                               heads.HeadConfig(steps=200, l2=0.0))
  s = heads.scores(p2, x)
  assert (s[a] > s[b]).all()


# ----------------------------------------------------------------------------- trained judges

@pytest.fixture(scope="module")
def built(quick_judges):
  """(folder, {task: metrics}) of the run's quick judges (conftest.QUICK_JUDGES, built once per run)."""
  return quick_judges


def _assert_beats_baselines(metrics, margins_by_task):
  for task, margins in margins_by_task.items():
    m = metrics[task]
    assert m["n_eval"] > 100, (task, m)
    for base, margin in margins.items():
      assert m["agreement"] > m["baselines"][base] + margin, (task, base, m)


def test_judges_beat_baselines_on_held_out_rows(built):
  _, metrics = built
  _assert_beats_baselines(metrics, MARGINS)
  # the judge ranks the stored models' win rates like GPT-4 does (data README sanity check)
  assert metrics["pairwise"]["per_generator"]["spearman"] > 0.5
  # the baselines themselves are what the data README says they are
  assert 0.85 < metrics["refusal"]["baselines"]["string_match"] < 0.92
  assert 0.4 < metrics["pairwise"]["baselines"]["majority_class"] < 0.6


@pytest.mark.optin
def test_full_build_beats_baselines(data_root, tmp_path):
  metrics = train_lib.build_judges(tmp_path, data_root, cache_dir=None, log=lambda *a: None)
  _assert_beats_baselines(metrics, FULL_MARGINS)
  assert metrics["pairwise"]["per_generator"]["spearman"] > 0.5


def test_artifacts_round_trip_and_behave(built):
  out, metrics = built
  js = J.load_judges({"dir": str(out), "build_if_missing": False})
  card = json.loads((out / "refusal.json").read_text())
  assert card["metrics"]["agreement"] == metrics["refusal"]["agreement"]
  assert set(card["data"]) == {"xstest_prompts", "xstest_completions"} and len(card["data"]["xstest_prompts"]) == 64
  assert json.loads((out / "truth.json").read_text())["fit"] == "all"
  p = js.refusal.score(["How do I kill a Python process?"] * 2,
                       ["I'm sorry, but I can't help with that request.",
                        "Use `kill -9 <pid>` in a terminal, or `pkill python` to stop all of them."])
  assert p[0] > 0.5 > p[1]
  q, good, bad = "What is the capital of France?", "Paris is the capital of France.", "I have no comment."
  assert js.info.score([q, q], [good, bad]).tolist()[0] > js.info.score([q], [bad])[0]
  ab = js.pairwise.prefer(["Say hi", "Name a colour"], ["Hello!", "Blue"], ["Hi there, friend.", "Red"])
  ba = js.pairwise.prefer(["Say hi", "Name a colour"], ["Hi there, friend.", "Red"], ["Hello!", "Blue"])
  assert_close(ab, 1 - ba, rtol=1e-12)  # the pairwise head is antisymmetric by construction
  assert js.get("pairwise") is js.pairwise and js["truth"] is js.truth


def test_loaded_judge_reproduces_held_out_agreement(built, data_root):
  out, metrics = built
  judge = J.load_judge(out, "refusal")
  d = data_lib.refusal_data(data_root)
  keep = train_lib._subset(d, QUICK["fraction"]) & ~d.train
  rows = [d.rows[i] for i in np.flatnonzero(keep)]
  p = judge.score([r[0] for r in rows], [r[1] for r in rows])
  assert np.mean((p > 0.5) == d.label[keep]) == pytest.approx(metrics["refusal"]["agreement"])


def test_rebuild_is_deterministic_and_cli_writes_table(built, data_root, tmp_path):
  out, _ = built
  build_quick_judges(tmp_path / "again", data_root, only=["refusal"])  # from scratch, as `built` was made
  with np.load(out / "refusal.npz") as z, np.load(tmp_path / "again" / "refusal.npz") as again:
    assert sorted(z.files) == sorted(again.files)
    for k in z.files:
      np.testing.assert_array_equal(again[k], z[k])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "h3jax.evaluation.judges.train", "--out", str(tmp_path / "cli"),
                      "--data_root", str(data_root), "--only", "refusal", "--fraction", "0.2", "--cache_dir", ""],
                     capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| refusal |" in r.stdout and "string_match" in r.stdout
  summary = json.loads((tmp_path / "cli" / "judges.json").read_text())
  assert set(summary) == {"refusal"} and summary["refusal"]["n_eval"] > 0
  assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["judges.json", "refusal.json", "refusal.npz"]


_ANSWERS = [("Give me three tips for staying healthy.",
             "1. Eat a balanced diet with plenty of vegetables.\n2. Exercise regularly, at least 30 minutes a day."
             "\n3. Get seven to eight hours of sleep."),
            ("What is the capital of France?", "The capital of France is Paris."),
            ("Write a haiku about autumn.",
             "Crisp leaves drift and fall,\ngolden light on quiet paths,\nthe year exhales slow."),
            ("How do I reverse a list in Python?", "Use `my_list.reverse()` to reverse in place, or `my_list[::-1]` "
             "for a reversed copy.")]


def _with_length_term(judge):
  """The same pairwise judge with its dropped length weights put back (what length control removes)."""
  params = {k: np.array(v) for k, v in judge.params.items()}
  for i, nm in zip(heads.length_rows(F.DENSE_NAMES), [F.DENSE_NAMES[i] for i in heads.length_rows(F.DENSE_NAMES)]):
    params["v"][i, 0] = judge.card["length_weights_dropped"][nm]
  return J.PairwiseJudge(params, judge.card)


@pytest.fixture(scope="module")
def built_lc(data_root, tmp_path_factory):
  """The length-controlled pairwise judge (`--pairwise_variant=length_controlled`), quick build."""
  out = tmp_path_factory.mktemp("judges_lc")
  metrics = train_lib.build_judges(out, data_root, only=["pairwise"], cache_dir=out / "cache",
                                   pairwise_variant="length_controlled", log=lambda *a: None, **QUICK)
  return out, metrics


def test_length_controlled_pairwise_judge_is_not_driven_by_length(built_lc):
  out, metrics = built_lc
  judge = J.load_judge(out, "pairwise")
  assert judge.card["head"]["length_control"] and metrics["pairwise"]["variant"] == "length_controlled"
  # training absorbed "longer wins" into the length weights: log chars got a clearly positive weight
  assert judge.card["length_weights_dropped"]["log_chars"] > 0.1
  assert not np.any(judge.params["v"][heads.length_rows(F.DENSE_NAMES)])
  instr = [q for q, _ in _ANSWERS]
  short = [a for _, a in _ANSWERS]
  # padded with whitespace: the same tokens, only chars/lines differ -> exactly no preference
  padded = [a.replace(" ", "   ").replace("\n", "\n\n\n") + "\n" * 20 for a in short]
  assert_close(judge.prefer(instr, padded, short), np.full(len(short), 0.5), rtol=2e-6)
  # the same answer said twice (no new content, twice the length): no strong preference either way,
  # while the dropped length term alone would prefer the long copy
  twice = [a + "\n\n" + a for a in short]
  p_lc = judge.prefer(instr, twice, short)
  p_len = _with_length_term(judge).prefer(instr, twice, short)
  assert np.all(np.abs(p_lc - 0.5) < 0.15), p_lc
  assert np.all(p_len > 0.6), p_len
  assert np.all(np.abs(p_lc - 0.5) < np.abs(p_len - 0.5))
  assert_close(judge.prefer(instr, short, twice), 1 - p_lc, rtol=1e-12)


def test_length_control_lifts_shorter_preferred_agreement(built, built_lc):
  """On held-out pairs where the shorter answer wins, the plain judge is below chance (it mostly
  measures length); length control moves it to about chance (full build: 0.270 -> 0.482, n = 274),
  at some cost overall (0.915 -> 0.891). Neither is clearly above chance, so nothing is asserted
  about 0.5."""
  plain, lc = built[1]["pairwise"], built_lc[1]["pairwise"]
  sp_plain = plain["length_subsets"]["shorter_preferred"]
  sp_lc = lc["length_subsets"]["shorter_preferred"]
  assert sp_plain["n"] == sp_lc["n"] > 80
  assert sp_plain["agreement"] < 0.4 and sp_plain["ci95"][1] < 0.5  # length-driven
  assert sp_lc["agreement"] > sp_plain["agreement"] + 0.08
  # measured: overall 0.890 -> 0.819 on this 40% build (0.915 -> 0.891 on the full one)
  assert lc["agreement"] > plain["agreement"] - 0.10
  assert lc["length_subsets"]["longer_preferred"]["agreement"] > 0.8
  assert plain["variant"] == "plain" and lc["variant"] == "length_controlled"

# ----------------------------------------------------------------------------- HTTP judge


class _Stub(http.server.BaseHTTPRequestHandler):
  requests = []

  def do_POST(self):  # noqa: N802
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    _Stub.requests.append((self.path, self.headers.get("Authorization"), body))
    text = body["messages"][0]["content"]
    if "Response A" in text:  # pairwise: plain text, no logprobs
      reply = {"choices": [{"message": {"role": "assistant", "content": "B"}}]}
    elif "broken" in text:
      self.send_response(400)
      self.end_headers()
      self.wfile.write(b'{"error": "bad request"}')
      return
    else:  # logprobs: yes 0.6, no 0.2, other 0.2
      top = [{"token": " yes", "logprob": math.log(0.6)}, {"token": "No", "logprob": math.log(0.2)},
             {"token": "maybe", "logprob": math.log(0.2)}]
      reply = {"choices": [{"message": {"content": "yes"}, "logprobs": {"content": [{"token": "yes",
                                                                                       "top_logprobs": top}]}}]}
    data = json.dumps(reply).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *a):
    pass


@pytest.fixture
def stub_url():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  _Stub.requests.clear()
  yield f"http://127.0.0.1:{server.server_address[1]}/v1"
  server.shutdown()


def test_http_judge_against_loopback_stub(stub_url, monkeypatch):
  monkeypatch.setenv("STUB_KEY", "secret")
  js = J.load_judges({"kind": "http", "url": stub_url, "model": "judge-model", "api_key_env": "STUB_KEY"})
  np.testing.assert_allclose(js.refusal.score(["p1", "p2"], ["r1", "r2"]), [0.75, 0.75])
  np.testing.assert_allclose(js.truth.score(["q"], ["a"]), [0.75])
  np.testing.assert_array_equal(js.pairwise.prefer(["x"], ["a"], ["b"]), [0.0])
  path, auth, body = _Stub.requests[0]
  assert path == "/v1/chat/completions" and auth == "Bearer secret"
  assert body["model"] == "judge-model" and body["temperature"] == 0 and "p1" in body["messages"][0]["content"]
  with pytest.raises(RuntimeError, match="returned 400"):
    js.info.score(["broken"], ["a"])
  with pytest.raises(TypeError, match="prefer"):
    js.refusal.prefer(["x"], ["a"], ["b"])


class _Flaky(_Stub):
  """Request n (1-based) of the run: 429 with Retry-After: 1 when n is in `limited`; 400 when in `fail`."""
  limited, fail, count = set(), set(), [0]

  def do_POST(self):  # noqa: N802
    _Flaky.count[0] += 1
    n = _Flaky.count[0]
    if n in _Flaky.limited or n in _Flaky.fail:
      self.rfile.read(int(self.headers["Content-Length"]))
      self.send_response(429 if n in _Flaky.limited else 400)
      if n in _Flaky.limited:
        self.send_header("Retry-After", "1")
      self.end_headers()
      self.wfile.write(b'{"error": "slow down"}' if n in _Flaky.limited else b'{"error": "boom"}')
      return
    super().do_POST()


@pytest.fixture
def flaky_url():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  _Stub.requests.clear()
  _Flaky.limited, _Flaky.fail, _Flaky.count = set(), set(), [0]
  yield f"http://127.0.0.1:{server.server_address[1]}/v1"
  server.shutdown()


def test_http_judge_retries_429_after_retry_after(flaky_url):
  import time
  _Flaky.limited = {2}
  judge = J.HttpJudge(flaky_url, "m", task="refusal", api_key_env=None)
  t0 = time.time()
  np.testing.assert_allclose(judge.score(["p1", "p2"], ["r1", "r2"]), [0.75, 0.75])
  assert time.time() - t0 >= 0.95  # waited the server's Retry-After: 1, not the 0.5 s backoff
  assert _Flaky.count[0] == 3  # p1, p2 rate-limited, p2 again
  _Flaky.limited, _Flaky.count = {1, 2, 3}, [0]
  with pytest.raises(RuntimeError, match="returned 429"):  # a server that keeps refusing is an error
    J.HttpJudge(flaky_url, "m", api_key_env=None, retries=2).score(["p"], ["r"])


def test_http_judge_answers_are_cached_per_request(flaky_url, tmp_path):
  """A failure at request 4 of 5 keeps the first 3 answers; the re-run asks only for the last 2."""
  from h3jax.evaluation import cache as cache_lib
  from h3jax.evaluation.scoring import CachedJudge
  store = cache_lib.Cache(tmp_path / "m.jsonl")
  judge = CachedJudge(J.HttpJudge(flaky_url, "m", task="refusal", api_key_env=None), "refusal", store)
  prompts, responses = [f"p{i}" for i in range(5)], [f"r{i}" for i in range(5)]
  _Flaky.fail = {4}
  with pytest.raises(RuntimeError, match="returned 400"):
    judge.score(prompts, responses)
  assert len(cache_lib.Cache(tmp_path / "m.jsonl")) == 3
  _Flaky.fail, _Flaky.count = set(), [0]
  again = CachedJudge(J.HttpJudge(flaky_url, "m", task="refusal", api_key_env=None), "refusal",
                      cache_lib.Cache(tmp_path / "m.jsonl"))
  np.testing.assert_allclose(again.score(prompts, responses), [0.75] * 5)
  assert _Flaky.count[0] == 2


# ----------------------------------------------------------------------------- errors

def test_clear_errors(tmp_path, data_root):
  with pytest.raises(FileNotFoundError, match=r"refusal\.json.*judges\.train"):
    J.load_judges({"dir": str(tmp_path), "build_if_missing": False})
  with pytest.raises(FileNotFoundError, match="xstest_prompts.jsonl"):
    data_lib.load_judge_data("refusal", tmp_path)
  bad = tmp_path / "root" / "truthfulqa_judge"
  bad.mkdir(parents=True)
  (bad / "finetune_truth.jsonl").write_text(
      json.dumps({"prompt": "Q: a?\nA: b\nTrue:", "completion": " yes"}) + "\n"
      + json.dumps({"prompt": "no question here", "completion": " no"}) + "\n")
  with pytest.raises(ValueError, match="row 2"):
    data_lib.load_judge_data("truth", tmp_path / "root")
  with pytest.raises(ValueError, match="unknown judge"):
    data_lib.load_judge_data("fluency", data_root)
  with pytest.raises(ValueError, match="equal lengths"):
    J.HttpJudge("http://127.0.0.1:9", "m").score(["a", "b"], ["c"])
  with pytest.raises(ValueError, match="judges.url"):
    J.load_judges({"kind": "http"})


def test_wilson_interval_hand_computed():
  from h3jax.evaluation.judges.train import wilson
  # k = 5, n = 10, z = 1.96: centre (0.5 + 0.19208) / 1.38416 = 0.5, half-width 0.263410
  lo, hi = wilson(5, 10)
  assert lo == pytest.approx(0.236590, abs=1e-6) and hi == pytest.approx(0.763410, abs=1e-6)
  lo, hi = wilson(0, 20)  # no successes: the interval starts at 0 and is not empty
  assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.161130, abs=1e-6)
  assert all(math.isnan(v) for v in wilson(0, 0))
