"""The trainer's data path (h3jax.data): task labels, packed == unpacked train step, packed resume,
refusal to resume on other data, and the quickstart config's data."""

import json
import pathlib

import jax
import numpy as np
import optax
import pytest

import test_train_step as tts
from conftest import SMOLLM2_DIR
from h3jax.checkpoint import load_params
from h3jax.data import pipeline as data_lib
from h3jax.data import tokenize as tok_lib
from h3jax.train import loop, objective, stages, step as step_lib
from h3jax.train.defaults import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def qa_rows(n, task=0, tag="q"):
  return [{"instruction": f"{tag}{i}?", "response": "ab" * (i % 4 + 1), "task": task} for i in range(n)]


def tiny_config(tmp_path, n=24, **data):
  c = load_config_file(REPO / "configs" / "tiny.py", "helpful")
  rows = [dict(r, task=i % 3) for i, r in enumerate(qa_rows(n))]
  c.data.sources = (write_jsonl(tmp_path / "d.jsonl", rows),)
  c.data.tasks = ()
  c.data.seq_len = 32
  c.data.eval_fraction = 0.0
  c.train.batch_size = 4
  c.train.eval_every = 0
  c.train.progress = False
  for k, v in data.items():
    c.data[k] = v
  return c


def test_task_labels_per_source_cumulative_and_overrides(tmp_path):
  c = load_config_file(REPO / "configs" / "tiny.py", "helpful")
  d = c.data
  d.sources = tuple(write_jsonl(tmp_path / f"{i}.jsonl", qa_rows(n, task=2, tag=f"s{i}"))
                    for i, n in enumerate((2, 1, 2)))
  d.tasks = ()
  d.max_examples = 0
  tasks = lambda: [r["task"] for r in stages.load_data_records(d)]
  assert tasks() == [0, 0, 1, 2, 2]
  d.task_labels = "cumulative"  # reference defect #5: [0]*2 + [1]*3 + [2]*5, cut to 5
  assert tasks() == [0, 0, 1, 1, 1]
  d.tasks = (2, 0, 1)
  assert tasks() == [2, 2, 0, 1, 1]
  d.tasks, d.max_examples = (), 1  # max_examples cuts each source before labelling
  assert tasks() == [0, 1, 1]
  d.task_labels = "per_source"
  assert tasks() == [0, 1, 2]
  d.sources = d.sources[:1]
  assert tasks() == [2]  # one source: the rows' own labels
  d.task_labels = "by_row"
  with pytest.raises(ValueError, match=r"unknown data.task_labels 'by_row'"):
    stages.load_data_records(d)


def test_mixture_source_equals_data_mixture(data_root):
  c = load_config_file(REPO / "configs" / "tiny.py", "helpful")
  c.data.sources, c.data.tasks, c.data.data_root, c.data.max_examples = ("mixture",), (), str(data_root), 0
  key = lambda recs: [(r["key"], r["task"]) for r in recs]
  for mode in ("per_source", "cumulative"):
    c.data.task_labels = mode
    assert key(stages.load_data_records(c.data)) == key(data_lib.mixture_records(data_root, task_labels=mode))
  c.data.task_labels, c.data.max_examples = "per_source", 5  # per axis
  assert [r["task"] for r in stages.load_data_records(c.data)] == [0] * 5 + [1] * 5 + [2] * 5
  c.data.sources = ("mixture", "helpful")
  with pytest.raises(ValueError, match=r"'mixture' \(the three 3H axes\) must be the only source"):
    stages.load_data_records(c.data)


def _all_examples_batch(records, pack, rows=8):
  """`rows` rows holding every record exactly once (epoch 0), packed or one per row; then padding rows."""
  kw = dict(max_len=48, seed=3, template="plain", pack=pack, add_eos=True)
  n = len(data_lib.make_iterator(records, tok_lib.ByteTokenizer(), batch_size=1, **kw).epoch_rows(0))
  b = data_lib.make_iterator(records, tok_lib.ByteTokenizer(), batch_size=n, **kw).batch(0)
  extra = {k: np.zeros((rows - n,) + v.shape[1:], np.int32) for k, v in b.items()}  # pad id 0, masks 0
  extra["positions_BT"][:] = np.arange(48)
  return {k: np.concatenate([b[k], extra[k]]) for k in b}, n


def test_packed_train_step_equals_unpacked():
  cfg, params, labels = tts.lora_setup(tts.tiny_cfg(vocab_size=259, max_position_embeddings=64))
  records = qa_rows(8, task=1)
  (flat, n_flat), (packed, n_packed) = _all_examples_batch(records, False), _all_examples_batch(records, True)
  assert n_flat == 8 and n_packed < 8 and not packed["attention_mask_BT"][n_packed:].any()
  assert packed["segment_ids_BT"].max() > 1 and packed["positions_BT"][0, 1:].min() == 0  # restarts
  assert flat["loss_mask_BT"].sum() == packed["loss_mask_BT"].sum()
  lc = objective.loss_config({}, cfg)
  tx = optax.sgd(0.5)  # plain SGD: updated params are a linear image of the gradients
  step_fn = jax.jit(step_lib.make_step(cfg, lc, labels, tx))  # one compile: same shapes and keys below

  def step(batch):
    state, m = step_fn(step_lib.init_state(params, tx), batch)
    return float(m["loss"]), state["params"]

  loss_flat, p_flat = step(flat)
  loss_packed, p_packed = step(packed)
  np.testing.assert_allclose(loss_packed, loss_flat, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p_flat), jax.tree.leaves(p_packed)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  # one segment and running positions per row: the packed examples see each other, another loss
  leaky = dict(packed, segment_ids_BT=packed["attention_mask_BT"],
               positions_BT=np.broadcast_to(np.arange(48, dtype=np.int32), packed["positions_BT"].shape))
  assert abs(step(leaky)[0] - loss_flat) > 1e-3


class _Crash(Exception):
  pass


def test_packed_resume_after_crash_equals_uninterrupted(tmp_path):
  c = tiny_config(tmp_path, pack=True)
  c.train.steps, c.train.checkpoint_every = 4, 2
  c.lora.dropout = 0.1  # dropout keys must line up too
  run = stages.setup(c)
  assert run.train.pack and len(run.train.epoch_rows(0)) < len(run.train.examples)
  full = loop.train_and_evaluate(c, tmp_path / "full", run=run)

  crashing = stages.setup(c)
  real_next = type(crashing.train).__next__

  class Crashing(type(crashing.train)):
    def __next__(self):
      if self.step == 3:  # after the step-2 checkpoint: like a kill mid-run
        raise _Crash()
      return real_next(self)

  crashing.train.__class__ = Crashing
  with pytest.raises(_Crash):
    loop.train_and_evaluate(c, tmp_path / "resumed", run=crashing)
  resumed = loop.train_and_evaluate(c, tmp_path / "resumed")
  assert resumed["loss"] == full["loss"]
  _, p_full = load_params(tmp_path / "full" / "checkpoints")
  _, p_res = load_params(tmp_path / "resumed" / "checkpoints")
  for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows(tmp_path / "resumed")] == list(range(1, 5))
  assert [r["train/loss"] for r in rows(tmp_path / "resumed")] == [r["train/loss"] for r in rows(tmp_path / "full")]

  # resuming the packed run's checkpoint with other data settings is refused, not silently wrong
  c.data.pack = False
  c.train.steps = 6
  with pytest.raises(ValueError, match=r"data iterator state was saved for other data or settings"):
    loop.train_and_evaluate(c, tmp_path / "resumed")


def test_make_data_eval_split_and_errors(tmp_path):
  c = tiny_config(tmp_path, n=20, eval_fraction=0.25)
  run = stages.setup(c)
  assert len(run.train.examples) == 15 and len(run.eval.examples) == 5
  b = run.train.batch(0)
  assert set(b) == set(data_lib.BATCH_KEYS) and b["input_ids_BT"].shape == (4, 32)
  tok = tok_lib.ByteTokenizer()
  ids = b["input_ids_BT"][0][b["attention_mask_BT"][0] > 0]
  # plain template: BOS, "instruction\n", response, EOS (config add_eos=True); loss on response + EOS
  text = tok.decode(ids)
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and "?\n" in text
  resp = b["loss_mask_BT"][0] > 0
  assert tok.decode(b["input_ids_BT"][0][resp]) == text.split("\n", 1)[1]
  c.data.eval_fraction = 1.0
  with pytest.raises(ValueError, match=r"eval_fraction=1.0 leaves no training examples of 20"):
    stages.setup(c)
  c = tiny_config(tmp_path, template="chat")
  with pytest.raises(ValueError, match=r"tokenizer has no chat template"):
    stages.setup(c)


def test_quickstart_config_data_builds(data_root):
  if not (SMOLLM2_DIR / "tokenizer.json").is_file():
    pytest.skip(f"SmolLM2 folder not found at {SMOLLM2_DIR} (python -m h3jax.prepare smollm2)")
  c = load_config_file(REPO / "configs" / "smollm2_quickstart.py")
  c.data.data_root = str(data_root)
  records = stages.load_data_records(c.data)
  assert [r["task"] for r in records] == [t for t in range(3) for _ in range(c.data.max_examples)]
  tok = tok_lib.load_tokenizer(str(SMOLLM2_DIR))
  it = stages.make_iterator(c.data, records, tok, c.train.batch_size, c.seed)
  b = next(it)
  assert b["input_ids_BT"].shape == (c.train.batch_size, c.data.seq_len) and it.state()["step"] == 1
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  for row in range(c.train.batch_size):  # chat targets end with the end-of-turn token unless truncated
    tgt = b["input_ids_BT"][row][b["loss_mask_BT"][row] > 0]
    assert len(tgt) and (tgt[-1] == im_end or b["attention_mask_BT"][row].all())


@pytest.mark.optin  # loads SmolLM2-135M and adds LoRA: ~15 s idle, ~30 s on the busy box
def test_quickstart_stage_a_sets_up_on_smollm2(data_root):
  if not (SMOLLM2_DIR / "tokenizer.json").is_file():
    pytest.skip(f"SmolLM2 folder not found at {SMOLLM2_DIR} (python -m h3jax.prepare smollm2)")
  from h3jax.train import h3fusion as pipeline
  c = load_config_file(REPO / "configs" / "smollm2_quickstart.py")
  c.data.data_root = str(data_root)
  tok = tok_lib.load_tokenizer(str(SMOLLM2_DIR))
  run = stages.setup(pipeline.stage_a_config(c, 0, str(SMOLLM2_DIR)))  # the pipeline's first stage
  assert run.cfg.vocab_size == len(tok) and run.tokenizer_source == str(SMOLLM2_DIR)
  assert len(run.train.examples) == c.data.max_examples and run.eval is None
  assert {int(e["task"]) for e in run.train.examples} == {0}
