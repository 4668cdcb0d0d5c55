"""Batched KV-cache generation: jitted prefill + jitted decode chunks.

Prompts are left-padded so every row's next token goes to the same cache slot.
Decoding runs `chunk` tokens per jitted `lax.while_loop` call; between chunks
the host checks stop strings, so a finished batch stops early without a
host round trip per token. Between chunks the batch is also *compacted*: once
at most half its rows are still running, they are gathered (with their cache)
into a batch half as large or smaller, since a decode step's cost grows with
its rows while one long answer would otherwise keep the whole batch busy.
Sampling draws per row from (seed, original row, step), so compaction does not
change what a row samples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from h3jax.config import ModelConfig
from h3jax.data import format as data_format
from h3jax.model import llama


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature == 0 means greedy (argmax); top_k == 0 and top_p == 1 disable filtering.

  repetition_penalty (transformers' semantics; 1 = off): before sampling or argmax, the logit of every
  token already in the row (prompt, padding included, and generated so far) is divided by it when
  positive and multiplied by it when negative. Small models decoded greedily fall into loops without it.
  penalize_eos=False exempts the end-of-sequence tokens (an extension): a chat prompt holds the end-of-turn
  token (and pads with it), so under transformers' rule every answer is pushed away from ending.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  penalize_eos: bool = True

  def __post_init__(self):
    if not self.repetition_penalty > 0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


# Attention during decoding reads the filled part of the cache rounded up to this many slots
# (one compiled decode chunk per bucket).
KV_BUCKET = 128


def sample_logits(logits_BV, key, sampling: SamplingConfig):
  """Next token ids [B] from float32 logits, with HF-style top-k then top-p filtering."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampling.top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)  # ascending, as transformers' TopPLogitsWarper
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    remove_BV = cum_BV <= 1.0 - sampling.top_p
    remove_BV = remove_BV.at[:, -1].set(False)  # always keep the most likely token
    cutoff_B1 = jnp.max(jnp.where(remove_BV, sorted_BV, neg), axis=-1, keepdims=True)
    logits_BV = jnp.where((logits_BV <= cutoff_B1) & jnp.any(remove_BV, -1, keepdims=True), neg, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def penalize_repeats(logits_BV, seen_BV, penalty: float):
  """transformers' RepetitionPenaltyLogitsProcessor: seen tokens' logits / penalty (> 0) or * penalty."""
  penalized_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalized_BV, logits_BV)


def sample_rows(logits_BV, key, seeds_B, sampling: SamplingConfig):
  """sample_logits with key folded with each row's seed, so a row's draw does not depend on
  the batch it is in (greedy needs no keys)."""
  if sampling.temperature == 0.0:
    return sample_logits(logits_BV, None, sampling)
  keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, seeds_B)
  return jax.vmap(lambda l_V, k: sample_logits(l_V[None], k, sampling)[0])(logits_BV, keys_B)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"), donate_argnums=())
def _prefill(params, ids_BP, mask_BP, cfg: ModelConfig, max_len: int):
  B, P = ids_BP.shape
  cache = llama.init_cache(cfg, B, max_len)
  key_mask_BS = jnp.concatenate([mask_BP.astype(bool), jnp.ones((B, max_len - P), bool)], axis=1)
  positions_BP = llama.positions_from_mask(mask_BP)
  logits_B1V, cache = llama.forward_cached(params, ids_BP, positions_BP, cache, 0, key_mask_BS, cfg,
                                           kv_len=P, last_only=True)  # left padding: last slot is real
  next_pos_B = jnp.sum(mask_BP.astype(jnp.int32), axis=-1)
  return logits_B1V[:, -1], cache, key_mask_BS, next_pos_B


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "n_steps", "kv_len"),
                   donate_argnames=("state",))
def _decode_chunk(params, state, eos_E, key, cfg: ModelConfig, sampling: SamplingConfig, n_steps: int,
                  kv_len: int):
  """Decode up to n_steps tokens into state["out_BN"], stopping early once every row is done.

  Attention reads only the first kv_len cache slots (they cover every slot this chunk writes).
  """
  start = state["step"]

  def cond(s):
    return (s["step"] < start + n_steps) & (s["step"] < s["out_BN"].shape[1]) & ~jnp.all(s["done_B"])

  def body(s):
    step = s["step"]
    logits_BV = s["logits_BV"]
    if "seen_BV" in s:
      logits_BV = penalize_repeats(logits_BV, s["seen_BV"], sampling.repetition_penalty)
    tok_B = sample_rows(logits_BV, jax.random.fold_in(key, step), s["row_B"], sampling)
    tok_B = jnp.where(s["done_B"], 0, tok_B)
    if "seen_BV" in s:
      s = dict(s, seen_BV=s["seen_BV"].at[jnp.arange(tok_B.shape[0]), tok_B].set(True))
    out_BN = s["out_BN"].at[:, step].set(tok_B)
    done_B = s["done_B"] | jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)
    logits_B1V, cache = llama.forward_cached(params, tok_B[:, None], s["pos_B"][:, None], s["cache"],
                                             s["cache_index"], s["key_mask_BS"], cfg, kv_len=kv_len)
    return dict(s, step=step + 1, out_BN=out_BN, done_B=done_B, logits_BV=logits_B1V[:, 0],
                cache=cache, cache_index=s["cache_index"] + 1, pos_B=s["pos_B"] + 1,
                lengths_B=jnp.where(s["done_B"], s["lengths_B"], step + 1))

  return jax.lax.while_loop(cond, body, state)


@jax.jit
def _take_rows(state, rows_R):
  """The decode state restricted to rows rows_R (batch axis 1 of the cache, 0 elsewhere)."""
  def take(path, x):
    if x.ndim == 0:
      return x
    return jnp.take(x, rows_R, axis=x.ndim - 4 if path[0].key == "cache" else 0)  # cache: [(M,) L, B, S, K, Dh]
  return jax.tree_util.tree_map_with_path(take, state)


def clear_compiled() -> None:
  """Drop the compiled prefill / decode / compaction programs. Each shape (rows, prompt + new tokens,
  KV bucket) compiles its own; on CPU one program of a 30-layer MoE holds ~0.15 GB, so a caller that
  moves on to longer prompts (the evaluation: shortest first) drops the shorter ones' programs."""
  for f in (_prefill, _decode_chunk, _take_rows):
    f.clear_cache()


# Compiled decode programs unroll every layer (every expert of a sparse MoE, every ensemble member): a
# 30-layer 3-expert MoE's holds ~0.15 GB on CPU. Programs of models up to this many unrolled layer copies
# are small and kept across prompt shapes: dropping them made the tiny study's in-process run recompile
# the same programs at every bucket (206 s against 157 s when kept, one idle 2-core run each).
SMALL_PROGRAM_LAYERS = 8


def programs_are_large(cfg: ModelConfig) -> bool:
  """Whether a caller moving on to another prompt shape should `clear_compiled` (see above)."""
  copies = cfg.num_layers * max(cfg.num_experts, 1) * max(cfg.ensemble_size, 1)
  return copies > SMALL_PROGRAM_LAYERS


def _compacted_rows(live_R):
  """Positions (into the current batch) of a smaller batch holding every live row.

  The batch shrinks by powers of two (few compiled shapes); the spare slots are
  filled with finished rows, which stay finished.
  """
  new = len(live_R)
  while new // 2 >= max(int(live_R.sum()), 1):
    new //= 2
  live_pos = np.flatnonzero(live_R)
  return np.concatenate([live_pos, np.flatnonzero(~live_R)[:new - len(live_pos)]]).astype(np.int32)


def generate_tokens(params, cfg: ModelConfig, prompt_ids_BP, prompt_mask_BP, *, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), eos_token_ids: Sequence[int] = (),
                    seed: int = 0, chunk: Optional[int] = None, should_stop=None, compact: bool = True,
                    row_seeds: Optional[Sequence[int]] = None):
  """Token-level generation from left-padded prompts.

  Returns (tokens [B, N] int32, lengths [B]) where lengths count generated tokens
  up to and including EOS. `should_stop(tokens [B, n], lengths [B]) -> bool[B]`
  is called before the first chunk and between chunks (e.g. stop strings, or
  filler rows); rows it flags are finished. `compact=False` keeps all B rows to
  the end. Sampling draws from (seed, row seed, step) with row seeds 0..B-1
  unless `row_seeds` [B] gives them (e.g. per prompt, so a prompt samples the
  same tokens in any batch).
  """
  params = llama.unstack_layers(params, cfg)
  ids_BP = jnp.asarray(prompt_ids_BP, jnp.int32)
  mask_BP = jnp.asarray(prompt_mask_BP, jnp.int32)
  B, P = ids_BP.shape
  N = max_new_tokens
  logits_BV, cache, key_mask_BS, next_pos_B = _prefill(params, ids_BP, mask_BP, cfg, P + N)
  state = dict(step=jnp.int32(0), out_BN=jnp.zeros((B, N), jnp.int32),
               done_B=jnp.zeros((B,), bool), logits_BV=logits_BV, cache=cache,
               cache_index=jnp.int32(P), pos_B=next_pos_B.astype(jnp.int32), key_mask_BS=key_mask_BS,
               lengths_B=jnp.zeros((B,), jnp.int32),
               row_B=jnp.asarray(np.arange(B) if row_seeds is None else row_seeds, jnp.uint32))
  if sampling.repetition_penalty != 1.0:  # every prompt token (padding too, as transformers) counts as seen
    state["seen_BV"] = jnp.zeros((B, cfg.vocab_size), bool).at[jnp.arange(B)[:, None], ids_BP].set(True)
    if not sampling.penalize_eos and eos_token_ids:  # a generated EOS ends its row: clearing once is enough
      state["seen_BV"] = state["seen_BV"].at[:, jnp.asarray(list(eos_token_ids), jnp.int32)].set(False)
  eos_E = jnp.asarray(list(eos_token_ids) or [-1], jnp.int32)
  key = jax.random.PRNGKey(seed)
  chunk = chunk or N
  # Host copies of every original row; state rows map to them through row_ids.
  out_BN, lengths_B, done_B = np.zeros((B, N), np.int32), np.zeros((B,), np.int32), np.zeros((B,), bool)
  row_ids, step = np.arange(B), 0
  while True:
    if should_stop is not None:
      done_B |= np.asarray(should_stop(out_BN[:, :step], lengths_B), bool)
    n_live = int((~done_B).sum())
    if step >= N or not n_live:
      break
    if compact and n_live <= len(row_ids) // 2:
      keep_R = _compacted_rows(~done_B[row_ids])
      state, row_ids = _take_rows(state, jnp.asarray(keep_R)), row_ids[keep_R]
    state["done_B"] = jnp.asarray(done_B[row_ids])
    kv_len = min(P + N, -(-(P + step + chunk) // KV_BUCKET) * KV_BUCKET)
    state = _decode_chunk(params, state, eos_E, key, cfg, sampling, chunk, kv_len)
    step = int(state["step"])
    out_BN[row_ids, :step] = np.asarray(state["out_BN"][:, :step])
    lengths_B[row_ids] = np.asarray(state["lengths_B"])
    done_B[row_ids] |= np.asarray(state["done_B"])
  return out_BN, lengths_B


# ----------------------------------------------------------------------------- text level

def pad_bucket(n: int, multiple: int = 16) -> int:
  """n rounded up to a multiple (at least one): padded lengths share compiled shapes."""
  return max(multiple, -(-n // multiple) * multiple)


def format_prompts(tokenizer, prompts: Sequence[str], *, chat: bool, system: Optional[str] = None):
  """Raw prompts, or (chat) each as one user turn of the tokenizer's chat template, ready to answer."""
  if not chat:
    return list(prompts)
  return [data_format.format_prompt(p, tokenizer, "chat", system=system or None) for p in prompts]


def eos_ids(cfg: ModelConfig, tokenizer) -> list:
  """The config's end-of-sequence ids and the tokenizer's."""
  eos = set(cfg.eos_token_id)
  if tokenizer.eos_token_id is not None:
    eos.add(int(tokenizer.eos_token_id))
  return sorted(eos)


def complete_batch(params, cfg: ModelConfig, tokenizer, texts: Sequence[str], *, rows: int, max_new_tokens: int,
                   sampling: SamplingConfig = SamplingConfig(), eos_token_ids: Sequence[int] = (),
                   stop_strings: Sequence[str] = (), add_special_tokens: bool = True, pad_to=pad_bucket,
                   seed: int = 0, row_seeds: Optional[Sequence[int]] = None, chunk: int = 32):
  """(completions, cut flags) of 1..rows formatted prompts, decoded as one batch of `rows` rows.

  The prompts are left-padded to pad_to(longest) tokens; spare rows hold one token and are done
  from the start, so a batch always has `rows` rows (one compiled shape per padded length). A
  completion ends at an EOS id (not part of the text) or at a stop string (cut from the text);
  `cut` says it reached max_new_tokens instead. The one text-level decoding path: `generate` and
  the evaluation (`h3jax.evaluation.infer`) both call it.
  """
  if not 0 < len(texts) <= rows:
    raise ValueError(f"complete_batch takes 1..{rows} prompts, got {len(texts)}")
  enc = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
  P = pad_to(max(len(e) for e in enc))
  ids_BP = np.full((rows, P), tokenizer.pad_token_id or 0, np.int32)
  mask_BP = np.zeros((rows, P), np.int32)
  for i, e in enumerate(enc):
    ids_BP[i, P - len(e):], mask_BP[i, P - len(e):] = e, 1
  mask_BP[len(enc):, -1] = 1
  stops, n_real = tuple(stop_strings), len(enc)

  def should_stop(tokens_BN, lengths_B):
    done = np.arange(len(tokens_BN)) >= n_real
    if stops:
      decoded = tokenizer.batch_decode(tokens_BN[:n_real], skip_special_tokens=True)
      done[:n_real] = [any(s in d for s in stops) for d in decoded]
    return done

  toks_BN, lengths_B = generate_tokens(
      params, cfg, ids_BP, mask_BP, max_new_tokens=max_new_tokens, sampling=sampling,
      eos_token_ids=eos_token_ids, seed=seed, chunk=chunk,
      should_stop=should_stop if stops or n_real < rows else None,
      row_seeds=None if row_seeds is None else list(row_seeds) + [0] * (rows - n_real))
  out, cut = [], []
  for i in range(n_real):
    row = [int(t) for t in toks_BN[i, :lengths_B[i]]]
    text = tokenizer.decode([t for t in row if t not in eos_token_ids], skip_special_tokens=True)
    stopped = any(s in text for s in stops)
    for s in stops:
      text = text.split(s, 1)[0]
    out.append(text)
    cut.append(bool(len(row) >= max_new_tokens and row[-1] not in eos_token_ids and not stopped))
  return out, cut


def generate(params, cfg: ModelConfig, tokenizer, prompts, *, chat: bool = False, system: Optional[str] = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_strings: Sequence[str] = (), eos_token_ids: Optional[Sequence[int]] = None,
             batch_size: int = 8, chunk: int = 32, progress: bool = False,
             repetition_penalty: float = 1.0, penalize_eos: bool = True) -> list:
  """Generate completions (text after the prompt) for one prompt or a list of prompts.

  Greedy when temperature == 0. Generation stops at an EOS id (default: the
  config's and the tokenizer's) or when a stop string appears; the stop string
  itself is cut from the returned text.
  """
  single = isinstance(prompts, str)
  prompts = [prompts] if single else list(prompts)
  sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, penalize_eos)
  texts = format_prompts(tokenizer, prompts, chat=chat, system=system)
  eos_token_ids = eos_ids(cfg, tokenizer) if eos_token_ids is None else list(eos_token_ids)
  params = llama.unstack_layers(params, cfg)  # once for all batches
  rows = batch_size if len(texts) > batch_size else len(texts)  # fixed shapes across batches
  outputs = []
  batches = range(0, len(texts), batch_size)
  if progress:
    import tqdm
    batches = tqdm.tqdm(batches, desc="generate", unit="batch")
  for start in batches:
    outputs += complete_batch(params, cfg, tokenizer, texts[start:start + batch_size], rows=rows,
                              max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
                              stop_strings=stop_strings, add_special_tokens=not chat, seed=seed + start,
                              chunk=chunk)[0]
  return outputs[0] if single else outputs
