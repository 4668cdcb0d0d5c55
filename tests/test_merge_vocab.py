"""Vocabulary alignment in merges (h3jax.merging.streaming.vocab) vs mergekit 0.1.5's `tokenizer_source` / `tokenizer`.

Tiny Llama models whose tokenizers differ: a base (96 tokens), two "chatml" models that add
<|im_start|> / <|im_end|> (98 rows), one whose embeddings are padded to 104 rows (same 96 tokens), one
whose tokenizer has the chat tokens but whose embeddings have 96 rows (mergekit strips those tokens).
mergekit runs every case in one background process while h3jax runs the same YAML.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import yaml

import merge_fixtures as mf
from h3jax.merging.streaming import config as mcfg
from h3jax.merging.streaming import driver
from h3jax.merging.streaming.inputs import MergeError

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = ("<|im_start|>", "<|im_end|>")
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_MERGED = ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed", "is",
           "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le", "the"]


def write_tokenizer(path, added=()):
  """A 96-token BPE tokenizer (3 specials, 62 characters, 31 merges), plus `added` special tokens."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  for t in list(_CHARS) + _MERGED:
    vocab[t] = len(vocab)
  merges = [(t[0], t[1]) for t in _MERGED if len(t) == 2] + [("th", "e")]
  tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
  fast.add_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
  fast.save_pretrained(path)


def _model(root, name, base_t, seed, rows, added=()):
  """base + a perturbation, its vocabulary tensors grown to `rows` rows (new rows random)."""
  rng = np.random.default_rng(seed)
  t = mf.perturb(base_t, seed, 0.02) if seed else dict(base_t)
  for k in ("model.embed_tokens.weight", "lm_head.weight"):
    extra = (0.1 * rng.standard_normal((rows - t[k].shape[0], t[k].shape[1]))).astype(np.float32)
    t[k] = np.concatenate([t[k], extra])
  path = mf.write_llama(root / name, t, mf.llama_config(False, num_hidden_layers=2, vocab_size=rows))
  write_tokenizer(path, added)
  return path


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
  root = tmp_path_factory.mktemp("vocab")
  base_t = mf.random_base(mf.llama_shapes(mf.llama_config(False, num_hidden_layers=2)), 5)
  return dict(base=_model(root, "base", base_t, 0, 96), a=_model(root, "chat_a", base_t, 11, 98, CHATML),
              a2=_model(root, "chat_b", base_t, 12, 98, CHATML), pad=_model(root, "padded", base_t, 13, 104),
              short=_model(root, "short", base_t, 14, 96, CHATML))


def _ws(paths, weights):
  return [dict(model=p, parameters=dict(weight=w, density=0.6)) for p, w in zip(paths, weights)]


# case -> YAML body (fam -> dict); every case runs in h3jax and in mergekit.
CASES = {
    "ties_union": lambda f: dict(merge_method="ties", base_model=f["base"], tokenizer_source="union",
                                 models=_ws([f["a"], f["pad"]], [1.0, 0.5])),
    "ties_base": lambda f: dict(merge_method="ties", base_model=f["base"], tokenizer_source="base",
                                models=_ws([f["a"], f["pad"]], [1.0, 0.5])),
    # <|im_*|> are in the base and one model: the padded model gets the base's rows.
    "ties_union_chat_base": lambda f: dict(merge_method="ties", base_model=f["a2"], tokenizer_source="union",
                                           models=_ws([f["a"], f["pad"]], [1.0, 0.8])),
    # The base's tokenizer has ids past its 96 rows: they are stripped from the output vocabulary.
    "ties_base_stripped": lambda f: dict(merge_method="ties", base_model=f["short"], tokenizer_source="base",
                                         models=_ws([f["a"], f["pad"]], [1.0, 0.5])),
    "ties_model_source": lambda f: dict(merge_method="ties", base_model=f["base"], tokenizer_source=f["a2"],
                                        models=_ws([f["a"], f["pad"]], [0.7, 1.0])),
    # <|im_*|> are in two of three models and there is no base: the third gets their mean.
    "linear_union_mean": lambda f: dict(merge_method="linear", tokenizer_source="union", models=[
        dict(model=f["pad"], parameters=dict(weight=1.0)), dict(model=f["a"], parameters=dict(weight=2.0)),
        dict(model=f["a2"], parameters=dict(weight=0.5))]),
    "linear_tokenizer_block": lambda f: dict(merge_method="linear", models=[
        dict(model=f["a"], parameters=dict(weight=1.0)), dict(model=f["a2"], parameters=dict(weight=0.3)),
        dict(model=f["pad"], parameters=dict(weight=0.6))], tokenizer=dict(
            source="union", pad_to_multiple_of=8, tokens={
                "<|im_start|>": dict(source=dict(kind="zero")),
                "<|im_end|>": dict(source=f["a2"], force=True),
                "<tool>": dict(source=dict(kind="model_token", model=f["a"], token="</s>"))})),
}


@pytest.fixture(scope="module")
def runs(fam, tmp_path_factory):
  """(h3jax out, mergekit out) per case; mergekit works in the background while h3jax merges."""
  if not mf.MERGEKIT_PY.exists():
    pytest.skip("mergekit oracle venv missing: run scripts/setup_oracles.sh")
  root = tmp_path_factory.mktemp("vocab_runs")
  bodies = {c: dict(build(fam), dtype="float32", out_dtype="float32") for c, build in CASES.items()}
  jobs = [dict(yaml=yaml.safe_dump(b), out=str(root / f"mk_{c}")) for c, b in bodies.items()]
  (root / "jobs.json").write_text(json.dumps(jobs))
  proc = mf.start_oracle(mf.MERGEKIT_PY, mf.MERGEKIT_BATCH, root / "jobs.json")
  try:
    for c, b in bodies.items():
      driver.run_merge(mcfg.from_mergekit_dict(b), root / f"h3_{c}", progress=False)
  finally:
    mf.wait_oracle(proc)
  return {c: (root / f"h3_{c}", root / f"mk_{c}") for c in CASES}


def _vocab(folder):
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  return tok.get_vocab(), {i: (a.content, a.special) for i, a in tok.added_tokens_decoder.items()}


@pytest.mark.oracle
@pytest.mark.parametrize("case", sorted(CASES))
def test_vocabulary_alignment_matches_mergekit(runs, case):
  ours_dir, theirs_dir = runs[case]
  ours, theirs = mf.read_tensors(ours_dir), mf.read_tensors(theirs_dir)
  assert sorted(ours) == sorted(theirs)
  for k, t in theirs.items():
    assert ours[k].shape == t.shape, (case, k)
    np.testing.assert_allclose(ours[k], t, rtol=1e-6, atol=1e-6 * np.abs(t).max(), err_msg=f"{case} {k}")
  assert _vocab(ours_dir) == _vocab(theirs_dir)
  cfg = json.loads((ours_dir / "config.json").read_text())
  assert cfg["vocab_size"] == json.loads((theirs_dir / "config.json").read_text())["vocab_size"] \
      == ours["model.embed_tokens.weight"].shape[0] == ours["lm_head.weight"].shape[0]


def test_rows_follow_mergekit_rules(fam, runs):
  """The aligned rows by hand, so the oracle comparison is not vacuous: ties_union's <|im_start|> row is
  the chat model's (the only input that has it); base vocabulary drops it and the padding rows."""
  a = mf.read_tensors(fam["a"])["model.embed_tokens.weight"]
  union = mf.read_tensors(runs["ties_union"][0])["model.embed_tokens.weight"]
  assert union.shape[0] == 98 and np.array_equal(union[96:], a[96:])
  assert mf.read_tensors(runs["ties_base"][0])["model.embed_tokens.weight"].shape[0] == 96
  assert len(_vocab(runs["ties_base_stripped"][0])[0]) == 96
  block = mf.read_tensors(runs["linear_tokenizer_block"][0])["model.embed_tokens.weight"]
  vocab, _ = _vocab(runs["linear_tokenizer_block"][0])
  assert block.shape[0] == 104 and vocab["<tool>"] == 98
  a2 = mf.read_tensors(fam["a2"])["model.embed_tokens.weight"]
  np.testing.assert_allclose(block[97], a2[97], rtol=1e-6)  # forced: a2's row in every input
  np.testing.assert_allclose(block[98], a[2], rtol=1e-6)  # model_token: a's </s> row in every input
  np.testing.assert_allclose(block[100], block[103], rtol=0)  # padding rows: a mean row


@pytest.mark.parametrize("case", ["ties_union", "linear_tokenizer_block"])
def test_output_loads_in_transformers(runs, case):
  torch = pytest.importorskip("torch")
  out = runs[case][0]
  tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ids = tok("<|im_start|>the cat<|im_end|>", return_tensors="pt").input_ids
  assert ids[0, 0].item() == 96 and ids[0, -1].item() == 97
  logits = model(ids).logits
  assert logits.shape[-1] == model.config.vocab_size >= len(tok) and torch.isfinite(logits).all()


def test_same_vocabulary_copies_the_tokenizer_files(fam, tmp_path):
  """tokenizer_source: base over inputs that share the base's vocabulary: nothing is re-indexed and the
  base's tokenizer files are copied byte for byte (as without tokenizer_source)."""
  spec = mcfg.from_mergekit_dict(dict(merge_method="linear", tokenizer_source="base", models=[
      dict(model=fam["base"], parameters=dict(weight=1.0)), dict(model=fam["base"], parameters=dict(weight=2.0))]))
  driver.run_merge(spec, tmp_path / "out", progress=False)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "out" / f).read_bytes() == (pathlib.Path(fam["base"]) / f).read_bytes()
  assert not json.loads((tmp_path / "out" / "h3jax_merge.json").read_text())["vocab_aligned"]


def test_different_vocabularies_without_tokenizer_source_are_refused(fam, tmp_path):
  spec = mcfg.from_mergekit_dict(dict(merge_method="ties", base_model=fam["base"],
                                      models=_ws([fam["a"]], [1.0])))
  with pytest.raises(MergeError, match="vocab_size = 96 .* but 98 .*tokenizer_source: union"):
    driver.run_merge(spec, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, msg", [
    (dict(tokenizer_source="unoin"), "'unoin' is neither 'base', 'union' nor an existing model folder"),
    (dict(tokenizer_source="/no/such/model"), "is neither 'base', 'union' nor an existing model folder"),
    (dict(tokenizer_source=3), "must be 'base', 'union' or a model path"),
    (dict(tokenizer_source="union", tokenizer=dict(source="base")), "not both"),
    (dict(tokenizer=dict(source="union", pad_to_multiple_of=0)), "pad_to_multiple_of must be a positive"),
    (dict(tokenizer=dict(sauce="union")), "tokenizer must be a mapping with keys"),
    (dict(tokenizer=dict(tokens={"<x>": dict(source="/elsewhere")})), "is not an input of this merge"),
    (dict(tokenizer=dict(tokens={"<x>": dict(source=dict(kind="model_token", model="M0"))})), "token string or"),
])
def test_bad_tokenizer_config_is_one_clear_error(fam, tmp_path, extra, msg):
  body = dict(merge_method="ties", base_model=fam["base"], models=_ws([fam["a"]], [1.0]), **extra)
  body = json.loads(json.dumps(body).replace('"M0"', json.dumps(fam["a"])))
  cfg = tmp_path / "merge.yaml"
  cfg.write_text(yaml.safe_dump(body))
  from h3jax.merging.streaming import merge_from_config
  with pytest.raises(mcfg.MergeConfigError, match=msg) as e:
    merge_from_config(str(cfg), str(tmp_path / "out"), progress=False)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "out").exists()


def test_token_source_without_the_token_is_refused_before_writing(fam, tmp_path):
  spec = mcfg.from_mergekit_dict(dict(merge_method="ties", base_model=fam["base"], models=_ws([fam["a"]], [1.0]),
                                      tokenizer=dict(tokens={"<|im_end|>": dict(source=fam["base"])})))
  with pytest.raises(MergeError, match="its source .* does not have it"):
    driver.run_merge(spec, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()
