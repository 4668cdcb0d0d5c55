"""Mixture, deterministic shuffling, exact resume, and packing (checked against
unpacked forward passes of a tiny h3jax model)."""

import collections
import json

import jax
import numpy as np
import pytest

import h3jax
from conftest import SMOLLM2_DIR
from h3jax.data import format as fmt
from h3jax.model.params import param_shapes
from h3jax.data import pipeline
from h3jax.data import tokenize as tk
from numerics import assert_close

BT = tk.ByteTokenizer()


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"instruction": "q" * int(rng.integers(1, 12)), "response": "r%d" % i + "a" * int(rng.integers(0, 9)),
           "task": i % 3} for i in range(n)]


def _it(n=10, *, pack=False, batch_size=3, max_len=320, seed=7, start_step=0):
  return pipeline.make_iterator(_records(n), BT, batch_size=batch_size, max_len=max_len, seed=seed,
                                template="alpaca", pack=pack, end_marker="", start_step=start_step)


def _eq(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_is_exact(pack):
  ref = _it(pack=pack)
  assert pack == any(len(r) > 1 for r in ref.epoch_rows(0))
  run = [next(ref) for _ in range(12)]  # 36 rows: crosses several epoch ends
  it = _it(pack=pack)
  for _ in range(5):
    next(it)
  saved = json.loads(json.dumps(it.state()))  # JSON round trip, as a checkpoint stores it
  assert saved["step"] == 5
  resumed = _it(pack=pack).restore(saved)
  assert all(_eq(next(resumed), run[s]) for s in range(5, 12))
  started = _it(pack=pack, start_step=8)
  assert _eq(next(started), run[8]) and _eq(started.batch(3), run[3])


def test_batch_layout_and_epochs():
  it = _it(n=12, batch_size=4)
  exs = it.examples
  seen = []
  for s in range(3):  # one epoch = 3 batches; every example exactly once
    b = it.batch(s)
    assert {k: v.dtype for k, v in b.items()} == {k: np.int32 for k in pipeline.BATCH_KEYS}
    assert b["input_ids_BT"].shape == (4, 320) and b["task_B"].shape == (4,)
    for row in range(4):
      n = int(b["attention_mask_BT"][row].sum())
      i = next(j for j, e in enumerate(exs) if np.array_equal(e["input_ids_T"], b["input_ids_BT"][row, :n]))
      seen.append(i)
      assert np.array_equal(b["loss_mask_BT"][row, :n], exs[i]["loss_mask_T"]) and b["task_B"][row] == exs[i]["task"]
      assert (b["input_ids_BT"][row, n:] == BT.pad_token_id).all() and not b["loss_mask_BT"][row, n:].any()
      assert (b["segment_ids_BT"][row] == b["attention_mask_BT"][row]).all()
      assert (b["positions_BT"][row] == np.arange(320)).all()
  assert sorted(seen) == list(range(12))
  assert it.steps_per_epoch() == 3
  # the order is the documented permutation, fresh per epoch
  assert [r[0] for r in it.epoch_rows(0)] == np.random.default_rng([7, 0]).permutation(12).tolist()
  assert it.epoch_rows(1) != it.epoch_rows(0)


def test_seed_changes_order_only():
  a, b = _it(seed=1), _it(seed=2)
  assert not _eq(a.batch(0), b.batch(0))
  assert sorted(map(tuple, a.epoch_rows(0))) == sorted(map(tuple, b.epoch_rows(0)))


def test_pack_order_hand_case():
  # lengths 5,4,3,6,2 (max 10), tasks 0,0,1,0,1: task-0 row [0,1] closes when #3 (6) does not fit
  rows = pipeline.pack_order([0, 1, 2, 3, 4], [5, 4, 3, 6, 2], [0, 0, 1, 0, 1], 10)
  assert rows == [[0, 1], [3], [2, 4]]


def test_packed_rows():
  it = _it(n=30, pack=True, batch_size=2)
  rows0 = it.epoch_rows(0)
  assert sorted(i for r in rows0 for i in r) == list(range(30))
  assert any(len(r) > 1 for r in rows0)
  for s in range(4):
    b = it.batch(s)
    for row in range(2):
      seg, pos = b["segment_ids_BT"][row], b["positions_BT"][row]
      n = int(b["attention_mask_BT"][row].sum())
      assert (seg[n:] == 0).all() and (np.diff(seg[:n]) >= 0).all() and seg[0] == 1
      for k in range(1, seg.max() + 1):
        where = np.nonzero(seg == k)[0]
        assert (pos[where] == np.arange(len(where))).all()  # positions restart per example
        assert b["loss_mask_BT"][row, where[0]] == 0  # a segment starts with its prompt


def test_packing_equals_unpacked_forward():
  """Packed rows with segment ids + positions give each example the logits it gets alone."""
  cfg = h3jax.ModelConfig(vocab_size=BT.vocab_size, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8)
  rng = np.random.default_rng(0)  # numpy init: no per-leaf compiles on a busy CPU
  params = jax.tree_util.tree_map_with_path(
      lambda path, shape: np.ones(shape, np.float32) if path[-1].key == "scale"
      else rng.normal(0, 0.1, shape).astype(np.float32), param_shapes(cfg),
      is_leaf=lambda x: isinstance(x, tuple))
  exs = [{"input_ids_T": rng.integers(3, BT.vocab_size, n).astype(np.int32), "loss_mask_T": np.ones(n, np.int32),
          "task": 0} for n in (9, 14, 6, 11, 17)]
  b = pipeline.BatchIterator(exs, batch_size=1, max_len=48, seed=0, pack=True).batch(0)
  assert b["segment_ids_BT"].max() >= 2
  fwd = jax.jit(h3jax.forward, static_argnames=("cfg",))
  packed = np.asarray(fwd(params, b["input_ids_BT"], cfg, attention_mask_BT=b["attention_mask_BT"],
                          positions_BT=b["positions_BT"], segment_ids_BT=b["segment_ids_BT"]))
  seg, T = b["segment_ids_BT"][0], b["input_ids_BT"].shape[1]
  spans = [np.nonzero(seg == k)[0] for k in range(1, seg.max() + 1)]
  alone_ids = np.zeros((len(spans), T), np.int32)  # each example alone, right-padded (causal: no effect)
  for k, where in enumerate(spans):
    alone_ids[k, :len(where)] = b["input_ids_BT"][0, where]
  alone = np.asarray(fwd(params, alone_ids, cfg, attention_mask_BT=(alone_ids > 0).astype(np.int32)))
  for k, where in enumerate(spans):
    assert_close(packed[0, where], alone[k, :len(where)], rtol=1e-5, atol_rel=1e-5)


def test_restore_rejects_other_data_or_settings():
  state = _it().state()
  with pytest.raises(ValueError, match="saved for other data or settings"):
    _it(n=11).restore(state)
  with pytest.raises(ValueError, match="saved for other data or settings"):
    _it(batch_size=4).restore(state)
  with pytest.raises(ValueError, match="not a data iterator state"):
    _it().restore({"step": 3})


def test_iterator_errors():
  with pytest.raises(ValueError, match="no examples to iterate over"):
    pipeline.BatchIterator([], batch_size=2, max_len=8, seed=0)
  exs = tk.tokenize_records(_records(3), BT, "alpaca", 200)
  with pytest.raises(ValueError, match="examples exceed max_len=16"):
    pipeline.BatchIterator(exs, batch_size=2, max_len=16, seed=0)
  with pytest.raises(ValueError, match="unknown prompt template"):
    pipeline.make_iterator(_records(3), BT, batch_size=2, max_len=16, seed=0, template="raw")


def test_mixture(data_root):
  recs = pipeline.mixture_records(data_root)
  assert collections.Counter(r["task"] for r in recs) == {0: 372, 1: 1160, 2: 1401}  # data README: 2,933
  assert [r["source"] for r in recs[:1]] == ["alpaca_eval"] and recs[-1]["source"] == "truthfulqa"
  eq = pipeline.mixture_records(data_root, weights={"helpful": 1, "harmless": 1, "honest": 1}, seed=3)
  counts = collections.Counter(r["task"] for r in eq)
  assert counts == {0: 978, 1: 978, 2: 978}  # round(2933 / 3) each
  help_eq = [r["key"] for r in eq if r["task"] == 0]
  assert len(set(help_eq)) == 372 and collections.Counter(collections.Counter(help_eq).values()) == {
      3: 978 - 2 * 372, 2: 372 - (978 - 2 * 372)}  # two whole copies, then a draw without replacement
  assert eq == pipeline.mixture_records(data_root, weights={"helpful": 1, "harmless": 1, "honest": 1}, seed=3)
  two = pipeline.mixture_records(data_root, weights={"helpful": 1, "honest": 3})
  assert collections.Counter(r["task"] for r in two) == {0: 443, 2: 1330}  # N = 372 + 1401 = 1773: 1/4, 3/4 of it
  with pytest.raises(ValueError, match="mixture weights must map axes"):
    pipeline.mixture_records(data_root, weights={"helpfulness": 1})
  bug = pipeline.mixture_records(data_root, task_labels="cumulative")
  assert [r["key"] for r in bug] == [r["key"] for r in recs]
  # hand count: 372 x 0, then [1] * (372 + 1160) = 1532 x 1, then the last 2933 - 1904 = 1029 x 2
  assert collections.Counter(r["task"] for r in bug) == {0: 372, 1: 1532, 2: 1029}
  assert [r["task"] for r in bug[1531:1533]] == [1, 1] and bug[1531]["source"] == "hh_rlhf_harmless"
  assert bug[1532]["source"] == "truthfulqa" and bug[1904]["task"] == 2
  assert pipeline.cumulative_task_labels([2, 3, 1]) == [0, 0, 1, 1, 1, 1]
  with pytest.raises(ValueError, match="task_labels must be 'per_source' or 'cumulative'"):
    pipeline.mixture_records(data_root, task_labels="cum")
  for bad in ({"helpful": "1"}, {"helpful": -1, "honest": 2}, {"helpful": 0}):
    with pytest.raises(ValueError, match="mixture weights must map axes"):
      pipeline.mixture_records(data_root, weights=bad)


def test_load_records(data_root, tmp_path):
  assert len(pipeline.load_records("honest", data_root=data_root)) == 1401
  assert len(pipeline.load_records("helpful", split="eval", data_root=data_root)) == 433
  harm = pipeline.load_records("harmless", data_root=data_root, task=0)
  assert len(harm) == 1160 and {r["task"] for r in harm} == {0}
  f = tmp_path / "mine.jsonl"
  f.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d", "task": 2}\n')
  recs = pipeline.load_records(str(f))
  assert [(r["instruction"], r["response"], r["task"]) for r in recs] == [("a", "b", 0), ("c", "d", 2)]
  f.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d", "task": 5}\n')
  with pytest.raises(ValueError, match=r"mine.jsonl:2: task must be 0, 1 or 2, got 5"):
    pipeline.load_records(str(f))
  f.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"\n')
  with pytest.raises(ValueError, match=r"mine.jsonl:2: malformed JSONL row"):
    pipeline.load_records(str(f))
  f.write_text('{"instruction": "a"}\n')
  with pytest.raises(ValueError, match=r"mine.jsonl:1: row lacks required field 'response'"):
    pipeline.load_records(str(f))
  with pytest.raises(ValueError, match="the mixture is a training set"):
    pipeline.load_records("mixture", split="eval", data_root=data_root)
  both = pipeline.load_records("harmless+refusals", data_root=data_root)  # "+" joins record sets in order
  assert len(both) == 1160 + 260 and both[1160:] == pipeline.load_records("refusals", data_root=data_root)
  assert pipeline.load_records("1", data_root=data_root) == pipeline.load_records("harmless", data_root=data_root)
  with pytest.raises(ValueError, match=r"unknown data spec 'harmles' in 'harmles\+refusals'"):
    pipeline.load_records("harmles+refusals", data_root=data_root)


def test_real_mixture_packed_batches_hold_whole_examples(data_root):
  """SmolLM2 chat template on real records: each packed segment is one record's prompt + reply."""
  if not SMOLLM2_DIR.is_dir():
    pytest.skip(f"SmolLM2 folder not found at {SMOLLM2_DIR}")
  tok = tk.load_tokenizer(SMOLLM2_DIR)
  recs = pipeline.mixture_records(data_root)
  recs = recs[:8] + recs[372:380] + recs[-8:]  # a few of each axis
  texts = [fmt.format_example(r, tok, "chat") for r in recs]
  it = pipeline.make_iterator(recs, tok, batch_size=4, max_len=256, seed=0, template="chat", pack=True)
  n_seg = 0
  for s in range(int(np.ceil(it.steps_per_epoch()))):
    b = it.batch(s)
    for row in range(4):
      seg = b["segment_ids_BT"][row]
      for k in range(1, seg.max() + 1):
        ids, m = b["input_ids_BT"][row, seg == k], b["loss_mask_BT"][row, seg == k]
        prompt = tok.decode(ids[m == 0], skip_special_tokens=False)
        reply = tok.decode(ids[m == 1], skip_special_tokens=False)
        # honesty records share a prompt (one per correct answer): match prompt and reply
        i = next(j for j, (p, t) in enumerate(texts) if p.endswith(prompt) and t.startswith(reply))
        assert b["task_B"][row] == recs[i]["task"] and len(reply) > 0
        n_seg += 1
  assert n_seg >= len(recs)
