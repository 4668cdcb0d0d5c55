"""Output ensemble (h3jax.model.ensemble): logits, greedy decoding and MC log-probs against a hand-computed
average of the members' probabilities; identical members equal the single model."""

import jax
import numpy as np
import pytest

from h3jax import generation
from h3jax.config import ModelConfig
from h3jax.evaluation import truthfulqa
from h3jax.model import ensemble, llama
from h3jax.model import params as params_lib
from eval_fakes import ModByteTokenizer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, eos_token_id=(2,), pad_token_id=0)


def _members(n=3, std=0.3):
  return [params_lib.init_params(CFG, jax.random.key(s), std=std) for s in range(n)]


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _hand_logp(members, ids_BT, mask_BT, mode):
  """log of the mean member probability (prob) or the renormalised mean log-prob (logprob), in float64."""
  lps = np.stack([_log_softmax(llama.forward(p, ids_BT, CFG, attention_mask_BT=mask_BT,
                                             positions_BT=llama.positions_from_mask(mask_BT)))
                  for p in members])
  if mode == "prob":
    return np.log(np.exp(lps).mean(0))
  return _log_softmax(lps.mean(0))


def _close(a, b, rtol=1e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.max(np.abs(a - b)) <= rtol * max(1.0, np.max(np.abs(b))), np.max(np.abs(a - b))


@pytest.mark.parametrize("mode", ["prob", "logprob"])
def test_forward_is_the_probability_average(mode):
  members = _members()
  ecfg = ensemble.ensemble_config(CFG, 3, mode)
  rs = np.random.RandomState(0)
  ids = rs.randint(3, 64, (2, 7))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  got = llama.forward(ensemble.stack_members(members), ids, ecfg, attention_mask_BT=mask,
                      positions_BT=llama.positions_from_mask(mask))
  want = _hand_logp(members, ids, mask, mode)
  _close(np.where(mask[..., None] > 0, got, 0), np.where(mask[..., None] > 0, want, 0))
  np.testing.assert_allclose(np.exp(np.asarray(got, np.float64)).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mode", ["prob", "logprob"])
def test_greedy_decoding_follows_the_averaged_distribution(mode):
  """Each generated token is the argmax of the hand-averaged next-token distribution given the prefix."""
  members = _members()
  ecfg = ensemble.ensemble_config(CFG, 3, mode)
  ids = np.array([[0, 0, 5, 9, 11], [7, 3, 4, 8, 21]])  # left padding in row 0
  mask = (np.arange(5)[None] >= np.array([[2], [0]])).astype(np.int32)
  toks, lengths = generation.generate_tokens(ensemble.stack_members(members), ecfg, ids, mask,
                                             max_new_tokens=6, chunk=4)
  seq, smask = ids, mask
  for t in range(6):
    lp = _hand_logp(members, seq, smask, mode)[:, -1]
    want = lp.argmax(-1)
    done = t >= lengths
    np.testing.assert_array_equal(np.where(done, 0, toks[:, t]), np.where(done, 0, want))
    seq = np.concatenate([seq, toks[:, t:t + 1]], 1)
    smask = np.concatenate([smask, np.ones((2, 1), np.int32)], 1)


def test_identical_members_equal_the_single_model():
  (p,) = _members(1)
  ecfg = ensemble.ensemble_config(CFG, 3, "prob")
  rs = np.random.RandomState(1)
  ids = rs.randint(3, 64, (4, 6))
  mask = np.ones_like(ids)
  mask[0, :2] = 0
  single, n1 = generation.generate_tokens(p, CFG, ids, mask, max_new_tokens=12, chunk=5)
  ens, n2 = generation.generate_tokens(ensemble.stack_members([p, p, p]), ecfg, ids, mask, max_new_tokens=12,
                                       chunk=5)
  np.testing.assert_array_equal(single, ens)
  np.testing.assert_array_equal(n1, n2)
  tok = ModByteTokenizer(64)
  ctx, cont = ["Q: what is up?\nA:", "Q: what is up?\nA:", "Q: why?\nA:"], [" sky", " ground", " because"]
  lp1 = truthfulqa.sequence_logprobs(p, CFG, tok, ctx, cont, batch_size=2)
  lp3 = truthfulqa.sequence_logprobs(ensemble.stack_members([p, p, p]), ecfg, tok, ctx, cont, batch_size=2)
  _close(lp3, lp1)


def test_mc_logprobs_are_sums_of_averaged_token_logprobs():
  members = _members()
  ecfg = ensemble.ensemble_config(CFG, 3, "prob")
  tok = ModByteTokenizer(64)
  ctx, cont = ["Q: name a colour\nA:", "Q: name a colour\nA:"], [" red", " a blue one"]
  got = truthfulqa.sequence_logprobs(ensemble.stack_members(members), ecfg, tok, ctx, cont, batch_size=2)
  for i in range(2):
    c, a = tok.encode(ctx[i]), tok.encode(cont[i], add_special_tokens=False)
    ids = np.array([c + a])
    lp = _hand_logp(members, ids, np.ones_like(ids), "prob")[0]
    want = sum(lp[len(c) - 1 + j, a[j]] for j in range(len(a)))
    _close(got[i], want)


def test_compaction_does_not_change_ensemble_tokens():
  members = _members()
  ecfg = ensemble.ensemble_config(CFG, 3, "prob")
  rs = np.random.RandomState(2)
  ids = rs.randint(3, 64, (4, 5))
  mask = np.ones_like(ids)
  params = ensemble.stack_members(members)
  stop = lambda toks, lengths: np.arange(4) >= 1  # only row 0 keeps decoding: the batch compacts to 1 row
  a, na = generation.generate_tokens(params, ecfg, ids, mask, max_new_tokens=10, chunk=3, should_stop=stop)
  b, nb = generation.generate_tokens(params, ecfg, ids, mask, max_new_tokens=10, chunk=3, should_stop=stop,
                                     compact=False)
  np.testing.assert_array_equal(a[0], b[0])


def test_bad_ensembles_are_errors():
  with pytest.raises(ValueError, match="at least 2 members"):
    ensemble.stack_members(_members(1))
  other = params_lib.init_params(CFG.replace(intermediate_size=40), jax.random.key(0))
  with pytest.raises(ValueError, match="same parameter shapes"):
    ensemble.stack_members([_members(1)[0], other])
  with pytest.raises(ValueError, match="ensemble mode"):
    ensemble.ensemble_config(CFG, 3, "vote")
