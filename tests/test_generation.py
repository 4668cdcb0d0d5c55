"""Generation: greedy identity with transformers.generate, sampling filters vs HF warpers, seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import h3jax
from h3jax import fusion, generation
from h3jax.model import llama
from numerics import assert_close, assert_greedy_equal
from tiny_hf import TINY, VARIANTS, make_model, save_model


def _left_padded(seed=0, batch=3, length=12):
  rs = np.random.RandomState(seed)
  ids = rs.randint(3, 128, (batch, length))
  mask = np.ones_like(ids)
  for row, n in enumerate([5, 0, 2][:batch]):
    ids[row, :n], mask[row, :n] = 0, 0
  return ids, mask


def _tiny_mixtral(top_k, seed=0):
  config = transformers.MixtralConfig(**dict(TINY, num_key_value_heads=2, num_local_experts=3,
                                             num_experts_per_tok=top_k, tie_word_embeddings=False,
                                             eos_token_id=None))
  torch.manual_seed(seed)
  model = transformers.MixtralForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
  return model


_log_probs = lambda logits: np.asarray(jax.nn.log_softmax(logits, axis=-1))


def _scores_along(params, cfg, ids, mask, toks):
  """(log-probs [B, P+N, V] of prompt + toks, the logits that chose each of toks [N, B, V]) in one forward."""
  seq = np.concatenate([ids, toks], axis=1)
  seq_mask = np.concatenate([mask, np.ones_like(toks)], axis=1)
  logits = llama.forward(params, jnp.asarray(seq), cfg, attention_mask_BT=jnp.asarray(seq_mask),
                         positions_BT=llama.positions_from_mask(jnp.asarray(seq_mask)))
  P, N = ids.shape[1], toks.shape[1]
  return _log_probs(logits), np.swapaxes(np.asarray(logits[:, P - 1:P - 1 + N]), 0, 1)


def _stepwise_log_probs(params, cfg, ids, mask, toks):
  """Log-probs of prompt + toks from cached decoding as generation runs it: a prefill of the prompt,
  then one token per call (experts split per layer)."""
  step = jax.jit(llama.forward_cached, static_argnames=("cfg",))
  seq = jnp.asarray(np.concatenate([ids, toks], axis=1))
  key_mask = jnp.asarray(np.concatenate([mask, np.ones_like(toks)], axis=1), bool)
  pos = llama.positions_from_mask(key_mask)
  split, (B, S), P = llama.unstack_layers(params, cfg), seq.shape, ids.shape[1]
  logits, cache = step(split, seq[:, :P], pos[:, :P], llama.init_cache(cfg, B, S), 0, key_mask, cfg=cfg)
  out = [logits]
  for t in range(P, S):
    logits, cache = step(split, seq[:, t:t + 1], pos[:, t:t + 1], cache, t, key_mask, cfg=cfg)
    out.append(logits)
  return _log_probs(jnp.concatenate(out, axis=1))


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_moe_decoding_equals_dense_and_transformers(top_k, tmp_path):
  """load_pretrained picks the sparse dispatch for a Mixtral (3 experts); its cached decoding (experts
  split per layer, a left-padded batch and batch 1) gives the dense dispatch's greedy tokens, and its
  log-probs (stacked experts; prefill + one token per step over split experts) equal the dense ones."""
  model = _tiny_mixtral(top_k)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  assert cfg.moe_dispatch == "sparse"
  dense = cfg.replace(moe_dispatch="dense")
  ids, mask = _left_padded(seed=3, batch=3)
  toks, lengths = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=16, chunk=5)
  want, want_len = generation.generate_tokens(params, dense, ids, mask, max_new_tokens=16, chunk=5)
  lp_dense, scores = _scores_along(params, dense, ids, mask, want)
  # token-identical except after a near-tie, which another CPU's summation order may break either way
  assert assert_greedy_equal(toks, want, scores) >= want.size // 2
  np.testing.assert_array_equal(lengths, want_len)
  with torch.no_grad():
    out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                         max_new_tokens=16, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
  ref = out.sequences[:, ids.shape[1]:].numpy()
  assert assert_greedy_equal(toks, ref, [s.numpy() for s in out.scores]) >= ref.size // 2
  one, _ = generation.generate_tokens(params, cfg, ids[:1, 5:], mask[:1, 5:], max_new_tokens=16)
  assert assert_greedy_equal(one, want[:1], scores[:, :1]) >= 8  # batch 1 (row 0 without its padding)
  real = np.concatenate([mask, np.ones_like(want)], axis=1).astype(bool)
  lp_sparse, _ = _scores_along(params, cfg, ids, mask, want)
  assert isinstance(llama.unstack_layers(params, cfg)["layers"][0]["moe"]["experts"], tuple)
  for got in (lp_sparse, _stepwise_log_probs(params, cfg, ids, mask, want)):
    assert_close(got[real], lp_dense[real], rtol=1e-5, atol_rel=1e-5)


def test_identical_experts_moe_decodes_as_the_dense_model(tmp_path):
  """A Mixtral folder of 3 copies of a model's MLP (top-2, random router) loads with the sparse dispatch
  and decodes the model's greedy tokens with its log-probs."""
  cfg, params = h3jax.load_pretrained(save_model(make_model("llama_mha_untied", std=0.3, eos_token_id=None),
                                                 tmp_path / "dense"))
  mcfg, mparams = fusion.fuse_params(cfg, params, [cfg] * 3, [params] * 3, top_k=2, router_std=1.0)
  mcfg, mparams = h3jax.load_pretrained(h3jax.save_pretrained(mparams, mcfg, tmp_path / "moe"))
  assert mcfg.moe_dispatch == "sparse" and mcfg.num_experts == 3
  ids, mask = _left_padded(seed=4, batch=3)
  want, _ = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=12)
  lp_want, scores = _scores_along(params, cfg, ids, mask, want)
  for rows in (slice(0, 3), slice(1, 2)):  # a left-padded batch, batch 1
    got, _ = generation.generate_tokens(mparams, mcfg, ids[rows], mask[rows], max_new_tokens=12)
    assert assert_greedy_equal(got, want[rows], scores[:, rows]) >= want[rows].size // 2
  real = np.concatenate([mask, np.ones_like(want)], axis=1).astype(bool)
  assert_close(_stepwise_log_probs(mparams, mcfg, ids, mask, want)[real], lp_want[real], rtol=1e-5, atol_rel=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_matches_transformers_generate(variant, tmp_path):
  # std 0.3 makes the logits peaked enough that near-ties are unlikely.
  model = make_model(variant, std=0.3, eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded()
  with torch.no_grad():
    out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                         max_new_tokens=20, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
  ref = out.sequences[:, ids.shape[1]:].numpy()
  toks, lengths = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=20, chunk=7)
  # token-identical except after a near-tie, which another CPU's summation order may break either way
  assert assert_greedy_equal(toks, ref, [s.numpy() for s in out.scores]) >= ref.size // 2
  np.testing.assert_array_equal(lengths, [20, 20, 20])


def test_eos_stops_rows_and_reports_lengths(tmp_path):
  model = make_model("llama_gqa_tied_llama3", std=0.3, eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded()
  free, _ = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=12)
  eos = int(free[0, 4])  # make row 0's 5th greedy token the EOS id
  toks, lengths = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=12, eos_token_ids=[eos])
  first = [int(np.argmax(np.append(r == eos, True))) for r in free]  # first EOS index (or 12)
  np.testing.assert_array_equal(lengths, [min(f + 1, 12) for f in first])
  for r, f in enumerate(first):
    np.testing.assert_array_equal(toks[r, :f + 1], free[r, :f + 1])
    assert (toks[r, f + 1:] == 0).all()  # nothing generated after EOS


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.7), (20, 0.5), (0, 0.05)])
def test_filters_match_transformers_warpers(top_k, top_p):
  logits = np.random.RandomState(0).standard_normal((4, 64)).astype(np.float32) * 3
  warpers = transformers.LogitsProcessorList(
      ([transformers.TopKLogitsWarper(top_k)] if top_k else []) +
      ([transformers.TopPLogitsWarper(top_p)] if top_p < 1 else []))
  ref_kept = np.isfinite(warpers(None, torch.as_tensor(logits)).numpy())
  sampling = generation.SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
  draws = jax.vmap(lambda k: generation.sample_logits(jnp.asarray(logits), k, sampling))(
      jax.random.split(jax.random.PRNGKey(0), 2000))  # [N, B]
  for b in range(4):
    seen = np.zeros(64, bool)
    seen[np.asarray(draws[:, b])] = True
    assert not (seen & ~ref_kept[b]).any(), "sampled a token transformers filters out"
    if ref_kept[b].sum() <= 5:  # small kept sets are fully covered by 2000 draws
      np.testing.assert_array_equal(seen, ref_kept[b])


def test_sampling_is_seeded(tmp_path):
  model = make_model("qwen2_bias", eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded()
  s = generation.SamplingConfig(temperature=1.0, top_k=50, top_p=0.95)
  a = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=16, sampling=s, seed=3)[0]
  b = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=16, sampling=s, seed=3, chunk=5)[0]
  c = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=16, sampling=s, seed=4)[0]
  np.testing.assert_array_equal(a, b)  # chunking does not change the stream
  assert (a != c).any()


def test_bad_sampling_arguments():
  with pytest.raises(ValueError, match="top_p must be in"):
    generation.SamplingConfig(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    generation.SamplingConfig(temperature=-1.0)


def test_cli_import_does_not_shadow_function():
  import importlib
  importlib.import_module("h3jax.cli.generate")  # the command's code; h3jax/generate.py is only `python -m`
  from h3jax import generate
  assert generate is h3jax.generate is generation.generate


@pytest.mark.parametrize("temperature,moe", [(0.0, False), (1.0, False), (0.0, True)])
def test_compaction_keeps_every_row_stream(temperature, moe, tmp_path):
  """Rows that finish early are dropped from the batch; the others decode exactly as in the full batch
  (for an MoE with the sparse dispatch too, whose expert groups change with the batch)."""
  model = _tiny_mixtral(2) if moe else make_model("llama_gqa_tied_llama3", std=0.3, eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded(seed=1, batch=8)
  s = generation.SamplingConfig(temperature=temperature)
  stop_at = np.array([2, 30, 3, 5, 30, 4, 9, 30])  # rows 1, 4, 7 run to the end
  seen_rows = []

  def should_stop(tokens_BN, lengths_B):
    seen_rows.append(int((lengths_B < stop_at).sum()))
    return tokens_BN.shape[1] >= stop_at

  kw = dict(max_new_tokens=30, sampling=s, seed=7, chunk=4, should_stop=should_stop)
  full, full_len = generation.generate_tokens(params, cfg, ids, mask, compact=False, **kw)
  compacted_rows = []
  orig = generation._decode_chunk

  def spy(params, state, *a, **k):
    compacted_rows.append(state["out_BN"].shape[0])
    return orig(params, state, *a, **k)

  generation._decode_chunk = spy
  try:
    toks, lengths = generation.generate_tokens(params, cfg, ids, mask, **kw)
  finally:
    generation._decode_chunk = orig
  assert compacted_rows[0] == 8 and compacted_rows[-1] == 4, compacted_rows  # 3 rows left -> 4-row batch
  np.testing.assert_array_equal(lengths, full_len)
  for r in range(8):
    np.testing.assert_array_equal(toks[r, :lengths[r]], full[r, :full_len[r]])


def test_rows_flagged_before_the_first_chunk_are_never_decoded(tmp_path):
  model = make_model("llama_gqa_tied_llama3", std=0.3, eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded(seed=2, batch=4)
  toks, lengths = generation.generate_tokens(
      params, cfg, ids, mask, max_new_tokens=6, should_stop=lambda t, n: np.array([0, 0, 1, 1], bool))
  ref, _ = generation.generate_tokens(params, cfg, ids[:2], mask[:2], max_new_tokens=6)
  np.testing.assert_array_equal(lengths, [6, 6, 0, 0])  # filler rows: nothing generated
  np.testing.assert_array_equal(toks[:2], ref)


def test_row_seeds_make_samples_independent_of_the_batch(tmp_path):
  model = make_model("qwen2_bias", eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids = np.random.RandomState(4).randint(3, 128, (3, 12))
  mask = np.ones_like(ids)
  s = generation.SamplingConfig(temperature=1.0)
  kw = dict(max_new_tokens=10, sampling=s, seed=5)
  a, _ = generation.generate_tokens(params, cfg, ids, mask, row_seeds=[11, 22, 33], **kw)
  b, _ = generation.generate_tokens(params, cfg, ids[[2, 0]], mask[[2, 0]], row_seeds=[33, 11], **kw)
  np.testing.assert_array_equal(b, a[[2, 0]])  # same prompt + row seed -> same samples, any position
  c, _ = generation.generate_tokens(params, cfg, ids, mask, row_seeds=[12, 22, 33], **kw)
  assert (c[0] != a[0]).any() and (c[1:] == a[1:]).all()


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers_generate(penalty, tmp_path):
  """Greedy with a repetition penalty (prompt and padding tokens count as seen) equals transformers'."""
  model = make_model("llama_gqa_tied_llama3", std=0.3, eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded()
  with torch.no_grad():
    ref = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                         max_new_tokens=16, pad_token_id=0, repetition_penalty=penalty)[:, ids.shape[1]:].numpy()
  sampling = generation.SamplingConfig(repetition_penalty=penalty)
  toks, _ = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=16, chunk=5, sampling=sampling)
  np.testing.assert_array_equal(toks, ref)
  plain, _ = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=16, chunk=5)
  assert not np.array_equal(plain, toks)  # the penalty changed the greedy path


def test_repetition_penalty_can_exempt_eos(tmp_path):
  """penalize_eos=False: the penalty skips the EOS token that the prompt holds (a chat prompt's end-of-turn
  token), so rows can end; equal to transformers with a hand-written processor that exempts it."""
  model = make_model("llama_gqa_tied_llama3", std=0.3, eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded()

  class ExemptEos(transformers.LogitsProcessor):
    def __init__(self, penalty, eos):
      self.penalty, self.eos = penalty, eos

    def __call__(self, input_ids, scores):
      seen = torch.gather(scores, 1, input_ids)
      out = scores.scatter(1, input_ids, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))
      out[:, self.eos] = scores[:, self.eos]
      return out

  def run(eos, penalize_eos):
    sampling = generation.SamplingConfig(repetition_penalty=1.5, penalize_eos=penalize_eos)
    return generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=16, chunk=5, sampling=sampling,
                                      eos_token_ids=[eos])
  # an EOS id from the prompt whose exemption ends a row early (searched: the model is random)
  eos = next(int(e) for e in ids[0, 5:] if (run(e, False)[1] < run(e, True)[1]).any())
  toks, lengths = run(eos, False)
  with torch.no_grad():
    ref = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                         max_new_tokens=16, pad_token_id=0, eos_token_id=eos,
                         logits_processor=transformers.LogitsProcessorList([ExemptEos(1.5, eos)])
                         )[:, ids.shape[1]:].numpy()
  for row in range(len(ids)):
    n = int(lengths[row])
    np.testing.assert_array_equal(toks[row, :n], ref[row, :n])
    assert n == 16 or ref[row, n - 1] == eos


def test_repetition_penalty_survives_compaction(tmp_path):
  model = make_model("llama_mha_untied", std=0.3, eos_token_id=None)
  cfg, params = h3jax.load_pretrained(save_model(model, tmp_path))
  ids, mask = _left_padded()
  sampling = generation.SamplingConfig(repetition_penalty=1.5)
  stop = lambda toks, lengths: np.arange(3) >= 1  # rows 1 and 2 finish at once: the batch compacts
  a, _ = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=12, chunk=4, sampling=sampling,
                                    should_stop=stop)
  b, _ = generation.generate_tokens(params, cfg, ids, mask, max_new_tokens=12, chunk=4, sampling=sampling,
                                    should_stop=stop, compact=False)
  np.testing.assert_array_equal(a[0], b[0])
