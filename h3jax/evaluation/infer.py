"""The evaluation's model inference, cached: prompts, bucketed batch generation, MC log-probs, router usage.

Every result goes into the model's `cache.Cache` after each batch, keyed by
the model's fingerprint (`models.fingerprint`: its weights, config and
tokenizer, never its name) and every output-changing setting, together
with the batch's compute time, so an interrupted run resumes where it stopped
and a run spread over several sessions can still state its total time.

Speed on CPU: prompts are sorted by length and left-padded to a few fixed
lengths (PROMPT_BUCKETS) with every batch padded to `batch_size` rows, so the
jitted prefill and decode compile once per bucket instead of once per
16-token length; filler rows are marked done at once so a short last batch
stops as soon as its real rows do.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from h3jax import generation, hostmem
from h3jax.config import ModelConfig
from h3jax.data import format as data_format
from h3jax.evaluation import cache as cache_lib
from h3jax.evaluation import models, truthfulqa
from h3jax.model import llama

PROMPT_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


class Progress:
  """One log line per step (done/total, seconds per item, ETA): readable in a nohup log, unlike tqdm."""

  def __init__(self, desc: str, total: int, enabled: bool = True):
    self.desc, self.total, self.enabled = desc, total, enabled and total > 0
    self.done, self.seconds = 0, 0.0
    if self.enabled:
      self._log(f"{total} to do")

  def _log(self, msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {self.desc}: {msg}", file=sys.stderr, flush=True)

  def update(self, n: int, seconds: float, cpu_seconds: float = 0.0):
    self.done, self.seconds = self.done + n, self.seconds + seconds
    if self.enabled:
      rate = self.seconds / max(self.done, 1)
      self._log(f"{self.done}/{self.total} ({rate:.2f} s/item, {seconds:.1f} s wall and {cpu_seconds:.1f} "
                f"CPU s this step, ETA {rate * (self.total - self.done) / 60:.1f} min)")


# ----------------------------------------------------------------------------- prompts

def prompt_template(config, tokenizer) -> str:
  """config.prompt_template: alpaca (the paper's), chat (the tokenizer's), plain; auto = chat if any."""
  t = config.prompt_template
  if t == "auto":
    t = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
  return data_format.check_template(t)


def generation_settings(config, template: str) -> dict:
  """Everything that changes a generation (it is hashed into the cache key)."""
  g = config.generation
  out = {"format": template, "system": g.system or None, "max_new_tokens": int(g.max_new_tokens),
         "temperature": float(g.temperature), "top_k": int(g.top_k), "top_p": float(g.top_p),
         "seed": int(g.seed), "dtype": config.dtype,
         "stop": list(g.stop_strings) + (["###"] if template == "alpaca" else [])}
  penalty = float(g.get("repetition_penalty", 1.0))
  if penalty != 1.0:  # only when set, so the keys of caches written without it stay valid
    out["repetition_penalty"] = penalty
    if not g.get("penalize_eos", True):
      out["penalize_eos"] = False
  return out


def model_inputs(tokenizer, prompts: Sequence[str], settings: dict) -> List[str]:
  """The exact prompt texts (`h3jax.data.format.format_prompt`, as in training)."""
  return [data_format.format_prompt(p, tokenizer, settings["format"], system=settings["system"])
          for p in prompts]


# ----------------------------------------------------------------------------- generation

def _prompt_bucket(n: int) -> int:
  return next((b for b in PROMPT_BUCKETS if b >= n), -(-n // 1024) * 1024)


def _rows(P: int, batch_size: int) -> int:
  """Rows per batch for prompts padded to P: fewer for long prompts, whose prefill logits
  [rows, P, V] would otherwise take gigabytes (only a few prompts are that long)."""
  return max(1, min(batch_size, batch_size * 256 // P))


def _encode(tok, text: str, settings: dict) -> list:
  return tok(text, add_special_tokens=settings["format"] != "chat")["input_ids"]


def generate_texts(model: dict, texts: Sequence[str], settings: dict, *, batch_size: int,
                   seed: int = 0, row_seeds: Optional[Sequence[int]] = None, return_cut: bool = False):
  """Completions of at most `batch_size` formatted prompts, as one padded [batch_size, P] batch
  (`generation.complete_batch`, prompts padded to PROMPT_BUCKETS).

  With return_cut, also whether each completion was cut by max_new_tokens (no EOS, no stop string)."""
  tok, cfg = model["tokenizer"], model["cfg"]
  sampling = generation.SamplingConfig(settings["temperature"], settings["top_k"], settings["top_p"],
                                       settings.get("repetition_penalty", 1.0),
                                       settings.get("penalize_eos", True))
  out, cut = generation.complete_batch(
      model["params"], cfg, tok, texts, rows=batch_size, max_new_tokens=settings["max_new_tokens"],
      sampling=sampling, eos_token_ids=generation.eos_ids(cfg, tok), stop_strings=settings["stop"],
      add_special_tokens=settings["format"] != "chat", pad_to=_prompt_bucket, seed=seed, row_seeds=row_seeds)
  return (out, cut) if return_cut else out


def in_shard(key: str, shard: Optional[Tuple[int, int]]) -> bool:
  """Whether the cache key belongs to part i of (i, n): a fixed split by key hash, so workers
  started at different times never take the same item."""
  return shard is None or int(key[:12], 16) % shard[1] == shard[0]


def generate_cached(model: dict, items: List[dict], settings: dict, store: cache_lib.Cache, *,
                    batch_size: int, desc: str = "generate", progress: bool = True,
                    shard: Optional[Tuple[int, int]] = None, return_cut: bool = False):
  """Responses for items (in order); only prompts missing from `store` are generated, shortest first.

  shard=(i, n): generate only the missing prompts of part i of n (`in_shard`); the other
  parts' responses are returned as None unless already cached. return_cut: also whether each
  response was cut by max_new_tokens (None where the cache row predates the flag).
  """
  tok, fp = model["tokenizer"], models.fingerprint(model)
  inputs = model_inputs(tok, [it["prompt"] for it in items], settings)
  # The prompt key (without the model) picks the shard and the sampling seed, so every model draws the
  # same random numbers for a prompt; the cache key adds the model's fingerprint.
  pkeys = [cache_lib.item_key("generation", x, settings) for x in inputs]
  keys = [cache_lib.item_key("generation", x, dict(settings, model=fp)) for x in inputs]
  lengths = {}
  for i, k in enumerate(keys):  # duplicate prompts are generated once
    if k not in store and k not in lengths and in_shard(pkeys[i], shard):
      lengths[k] = (len(_encode(tok, inputs[i], settings)), i)
  todo = [i for _, i in sorted(lengths.values())]
  bar = Progress(desc, len(todo), progress)
  s, bucket = 0, None
  while s < len(todo):
    rows = batch_size
    while True:  # shrink the batch until its longest prompt's bucket allows that many rows
      b = todo[s:s + rows]
      P = _prompt_bucket(lengths[keys[b[-1]]][0])
      rows = _rows(P, batch_size)
      if len(b) <= rows:
        break
    if bucket not in (None, P) and generation.programs_are_large(model["cfg"]):
      generation.clear_compiled()  # shortest first: the shorter buckets' programs are not needed again
    bucket = P
    t0, c0 = time.time(), time.process_time()
    texts, cut = generate_texts(model, [inputs[i] for i in b], settings, batch_size=rows,
                                seed=settings["seed"], row_seeds=[int(pkeys[i][:8], 16) for i in b],
                                return_cut=True)
    s += len(b)
    dt, dc = time.time() - t0, time.process_time() - c0
    store.put_many([(keys[i], "generation", t, {"id": items[i]["id"], "set": items[i]["set"], "model": fp,
                                                "cut": c})
                    for i, t, c in zip(b, texts, cut)] + [cache_lib.time_row("generate", dt, len(b), dc)])
    bar.update(len(b), dt, dc)
    hostmem.trim()  # the batch's freed temporaries stay resident otherwise (h3jax/hostmem.py)
  texts = [store.get(k) for k in keys]
  return (texts, [store.cut(k) for k in keys]) if return_cut else texts


# ----------------------------------------------------------------------------- TruthfulQA MC

def mc_cached(model: dict, items: List[dict], fmt: str, template: str, store: cache_lib.Cache, *,
              batch_size: int, system=None, progress: bool = True):
  """(mc1 scores, mc2 scores) per item; each (context, choice) is scored once and cached."""
  tok, fp = model["tokenizer"], models.fingerprint(model)
  settings = {"format": fmt, "template": template if fmt != "qa" else None, "system": system,
              "dtype": model["cfg"].dtype, "model": fp}
  pairs = {}  # key -> (context, continuation)
  keys = {t: [] for t in ("mc1_targets", "mc2_targets")}
  for it in items:
    ctx = truthfulqa.mc_context(tok, it["question"], fmt, template, system)
    for t in keys:
      ks = []
      for choice in it[t]["choices"]:
        k = cache_lib.item_key("mc", [it["question"], choice], settings)
        pairs.setdefault(k, (ctx, truthfulqa.mc_continuation(choice, fmt)))
        ks.append(k)
      keys[t].append(ks)
  todo = [k for k in pairs if k not in store]
  step = 8 * batch_size  # persisted every 8 batches; each call runs the shared prefix once
  bar = Progress(f"{model['name']}: MC log-probs (answer choices)", len(todo), progress)
  for s in range(0, len(todo), step):
    chunk = todo[s:s + step]
    t0, c0 = time.time(), time.process_time()
    lp = truthfulqa.sequence_logprobs(model["params"], model["cfg"], tok, [pairs[k][0] for k in chunk],
                                      [pairs[k][1] for k in chunk], batch_size=batch_size,
                                      add_special_tokens=truthfulqa.mc_add_special_tokens(fmt, template))
    dt, dc = time.time() - t0, time.process_time() - c0
    store.put_many([(k, "mc", float(v), {"model": fp}) for k, v in zip(chunk, lp)]
                   + [cache_lib.time_row("mc", dt, len(chunk), dc)])
    bar.update(len(chunk), dt, dc)
    hostmem.trim()
  return tuple([[store.get(k) for k in ks] for ks in keys[t]] for t in ("mc1_targets", "mc2_targets"))


# ----------------------------------------------------------------------------- router usage

@functools.partial(jax.jit, static_argnames=("cfg",))
def _router_sums(params, ids_BT, mask_BT, cfg: ModelConfig):
  _, aux = llama.forward(params, ids_BT, cfg, attention_mask_BT=mask_BT, return_aux=True)
  m_1BT1 = mask_BT.astype(jnp.float32)[None, :, :, None]
  probs_LE = jnp.sum(aux["router_probs_BTE"] * m_1BT1, axis=(1, 2))
  chosen_LBTE = jnp.sum(jax.nn.one_hot(aux["topk_idx_BTK"], cfg.num_experts), axis=-2)
  return probs_LE, jnp.sum(chosen_LBTE * m_1BT1, axis=(1, 2)), jnp.sum(mask_BT)


def router_usage(model: dict, texts: Sequence[str], batch_size: int) -> dict:
  """Mean router probability and top-k selection share per layer and expert over prompt tokens."""
  cfg, tok = model["cfg"], model["tokenizer"]
  probs_LE = np.zeros((cfg.num_layers, cfg.num_experts))
  chosen_LE = np.zeros_like(probs_LE)
  n_tok = 0.0
  for s in range(0, len(texts), batch_size):
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[s:s + batch_size]]
    T = max(32, -(-max(len(e) for e in enc) // 32) * 32)
    ids_BT = np.zeros((batch_size, T), np.int32)
    mask_BT = np.zeros((batch_size, T), np.int32)
    for i, e in enumerate(enc):
      ids_BT[i, :len(e)], mask_BT[i, :len(e)] = e, 1
    p, c, n = _router_sums(model["params"], jnp.asarray(ids_BT), jnp.asarray(mask_BT), cfg)
    probs_LE += np.asarray(p)
    chosen_LE += np.asarray(c)
    n_tok += float(n)
  return {"mean_prob": (probs_LE / max(n_tok, 1)).tolist(),
          "topk_share": (chosen_LE / max(n_tok * cfg.num_experts_per_tok, 1)).tolist(), "tokens": int(n_tok)}
