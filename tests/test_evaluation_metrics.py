"""Metric arithmetic: MC1/MC2, rates, win rate and the length-controlled win rate."""

import math

import numpy as np
import pytest
import scipy.optimize

from h3jax.evaluation import harm, metrics, truthfulqa


def test_mc1_mc2_hand_computed():
  # MC1: the true choice (-1.0) loses to a false one (-0.5).
  assert truthfulqa.mc1([-1.0, -2.0, -0.5], [1, 0, 0]) == 0.0
  assert truthfulqa.mc1([-0.4, -2.0, -0.5], [1, 0, 0]) == 1.0
  assert truthfulqa.mc1([-0.5, -0.5], [1, 0]) == 0.0  # a tie is not a win
  e = math.exp
  assert truthfulqa.mc2([-1.0, -2.0, -0.5], [1, 1, 0]) == pytest.approx(
      (e(-1) + e(-2)) / (e(-1) + e(-2) + e(-0.5)), rel=1e-12)
  # log-sum-exp stability with very negative scores
  assert truthfulqa.mc2([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + e(-1)), rel=1e-12)
  with pytest.raises(ValueError, match="true and false choices"):
    truthfulqa.mc2([-1.0, -2.0], [1, 1])


def test_rates_and_truth_info():
  r = metrics.rate([True, False, True, True])
  assert r["value"] == 0.75 and r["n"] == 4
  assert r["stderr"] == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
  ti = truthfulqa.truth_info_metrics([0.9, 0.6, 0.2, 0.5], [0.1, 0.7, 0.9, 0.5])
  assert ti["truthful"]["value"] == 0.75
  assert ti["informative"]["value"] == 0.75
  assert ti["truthful_informative"]["value"] == 0.5  # per-sample AND: items 1 and 3
  assert ti["per_item"]["truthful"] == [True, True, False, True]


def test_harm_set_metrics():
  p = [0.9, 0.1, 0.5, 0.49]
  assert harm.set_metrics("harmbench", p)["compliance_rate"]["value"] == 0.5
  assert harm.set_metrics("xstest_safe", p)["over_refusal_rate"]["value"] == 0.5
  assert harm.set_metrics("xstest_unsafe", [1, 1, 0, 1])["refusal_rate"]["value"] == 0.75
  pooled = harm.pooled_compliance({"harmbench": {"compliance_rate": metrics.rate([1, 0])},
                                   "advbench": {"compliance_rate": metrics.rate([1, 1, 1, 1])}})
  assert pooled["value"] == pytest.approx(0.75) and pooled["n"] == 6
  with pytest.raises(ValueError, match="unknown harmlessness set"):
    harm.set_metrics("beavertails", p)


def test_win_rate_counts_ties_half():
  assert metrics.win_rate([1.0, 0.0, 0.5, 0.5])["value"] == 0.5
  with pytest.raises(ValueError, match="probabilities"):
    metrics.win_rate([1.2])


def _objective(w, X, y, l2):
  z = X @ w
  return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * np.sum(w[1:] ** 2)


def test_lc_fit_matches_scipy():
  rs = np.random.RandomState(0)
  lm, lr = rs.randint(50, 2000, 300), rs.randint(50, 2000, 300)
  p = np.clip(0.6 + 0.3 * np.tanh((lm - lr) / 700) + 0.1 * rs.randn(300), 0, 1)
  X = metrics.lc_features(lm, lr)
  ref = scipy.optimize.minimize(_objective, np.zeros(2), args=(X, p, 1e-3), method="BFGS", tol=1e-12).x
  got = metrics._fit_logistic(X, p, 1e-3)
  assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref)  # norm-relative: one coefficient may be ~0
  lc = metrics.length_controlled_win_rate(p, lm, lr)
  assert lc["value"] == pytest.approx(1 / (1 + np.exp(-ref[0])), abs=1e-6)
  assert lc["raw"] == pytest.approx(p.mean()) and lc["n"] == 300 and lc["length_coef"] > 0


def test_lc_removes_a_pure_length_preference():
  rs = np.random.RandomState(1)
  lr = rs.randint(100, 1000, 400)
  lm = lr + rs.randint(-100, 600, 400)  # the model is mostly longer
  p = (lm > lr).astype(float)  # a judge that only looks at length
  lc = metrics.length_controlled_win_rate(p, lm, lr)
  assert p.mean() > 0.75
  assert abs(lc["value"] - 0.5) < abs(p.mean() - 0.5) / 2
  # a length-blind judge: LC equals the raw win rate
  q = np.full(400, 0.7)
  assert metrics.length_controlled_win_rate(q, lm, lr)["value"] == pytest.approx(0.7, abs=1e-3)
  with pytest.raises(ValueError, match="reference lengths"):
    metrics.length_controlled_win_rate(q, lm, lr[:-1])


def test_markdown_table_shows_sizes_errors_and_judge_agreement():
  from h3jax.evaluation import report
  results = {"models": {
      "a": {"metrics": {"honest/mc2": {"value": 0.25, "n": 4, "stderr": 0.1}}, "axes": {"honest": 0.25}},
      "b": {"metrics": {"honest/mc2": {"value": 0.5, "n": 4, "stderr": float("nan")}}, "axes": {"honest": None}}},
      "judges": {"refusal": {"metrics": {"agreement": 0.939, "n_eval": 1055,
                                         "baselines": {"string_match": 0.879, "majority_class": 0.483}}}}}
  table = report.markdown_table(results)
  assert "| metric | n | a | b |" in table
  assert "| honest/mc2 ↑ | 4 | 25.0 ± 10.0 | 50.0 |" in table
  assert "| refusal | 93.9 | 1055 | majority_class 48.3, string_match 87.9 |" in table


def test_lc_win_rate_is_na_when_too_few_items_to_fit():
  """At n = 2 the two-parameter fit interpolates: today's value/error (1.1 ± 2073.1 in a real run)
  carried no information. Below metrics.LC_MIN_N items it is n/a; the raw win rate stays."""
  from h3jax.evaluation import report
  lc = metrics.length_controlled_win_rate([0.5, 0.0], [10, 30], [200, 100])
  assert np.isnan(lc["value"]) and np.isnan(lc["stderr"]) and lc["n"] == 2 and lc["raw"] == 0.25
  results = {"models": {"m": {"metrics": {"helpful/lc_win_rate_text_davinci_003": lc,
                                          "helpful/win_rate_text_davinci_003": metrics.win_rate([0.5, 0.0])},
                              "axes": {"helpful": None}}}}
  table = report.markdown_table(results)
  assert "| helpful/lc_win_rate_text_davinci_003 ↑ | 2 | n/a |" in table
  assert "| helpful/win_rate_text_davinci_003 ↑ | 2 | 25.0 ± 25.0 |" in table
  rs = np.random.RandomState(2)  # from LC_MIN_N items on, a finite estimate with a sane error
  n = metrics.LC_MIN_N
  lm, lr = rs.randint(50, 2000, n), rs.randint(50, 2000, n)
  lc = metrics.length_controlled_win_rate(rs.uniform(0.2, 0.8, n), lm, lr)
  assert 0 < lc["value"] < 1 and 0 < lc["stderr"] < 0.5
