"""mergekit-moe YAML (mergekit 0.1.5) -> a Mixtral MoE, with mergekit-moe's router semantics.

Keys read unchanged: base_model, experts[].source_model / positive_prompts /
negative_prompts / residual_scale, gate_mode, experts_per_token, dtype,
architecture (mixtral only). Anything else (shared_experts, noise_scale, ...)
is one clear error. Experts and shared weights are built by
`h3jax.fusion.fuse_params` (FFN of expert i, everything else from the base);
only the router differs from h3jax's own inits. Per layer l, mergekit-moe's
router row for expert e (HF gate weight [E, D]; h3jax kernel [L, D, E]) is:

  random          torch.randn((L, E, D)) after torch.manual_seed(seed)
                  (`mergekit-moe --random-seed`); reproduced bit for bit up to
                  float rounding of sin/cos by `torch_randn` below, without torch
  uniform_random  torch.rand((L, E, D)) * 2s - s, s = 1/sqrt(D)
  cheap_embed     v(P) - v(N), normalised, the same in every layer; v(prompts) =
                  the unit-normalised sum of the base's token embeddings over all
                  real tokens of all prompts
  hidden          h(P) - h(N), normalised per layer; h = the residual stream
  (hidden_last)   entering layer l at each prompt's last token, averaged over
                  prompts. mergekit runs this in bfloat16; h3jax in float32, so
                  rows agree to bf16 accuracy (tests: relative error < 3e-2)
  hidden_avg      as hidden, but the mean over all T positions of the padded
                  batch (padding included, as mergekit does; not oracle-tested:
                  the states at left-padded positions may differ from torch's)

Prompts are tokenized as mergekit does: tokenizer BOS + prompt, no other
special tokens, left padding with the BOS id (EOS if there is none); positions
are 0..T-1 for every row (transformers' default without position_ids).
Unlike mergekit-moe, a source_model may be a PEFT adapter or MODEL+ADAPTER.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from h3jax.config import ModelConfig
from h3jax.model import llama

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
_TOP_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "architecture"}
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "residual_scale"}
_NOT_IMPLEMENTED = {"shared_experts": "shared experts (Mixtral has none; mergekit refuses them too)",
                    "noise_scale": "expert noise (noise_scale)"}
_DTYPES = ("float32", "bfloat16", "float16")


class MoEConfigError(ValueError):
  """A mergekit-moe YAML h3jax cannot build; raised before anything is loaded or written."""


def read_config(path_or_dict, where: Optional[str] = None) -> dict:
  """Parse and check a mergekit-moe YAML (path or dict) -> normalised dict."""
  if isinstance(path_or_dict, Mapping):
    raw, where = dict(path_or_dict), where or "moe config"
  else:
    p = pathlib.Path(path_or_dict)
    if not p.is_file():
      raise MoEConfigError(f"config file not found: {p}")
    try:
      raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
      raise MoEConfigError(f"{p}: not valid YAML ({e})") from None
    where = str(p)
  if not isinstance(raw, Mapping):
    raise MoEConfigError(f"{where}: a mergekit-moe config must be a mapping")

  def check_keys(d, allowed, what):
    for key in d:
      if key in _NOT_IMPLEMENTED:
        raise MoEConfigError(f"{where}: {what}{key!r} ({_NOT_IMPLEMENTED[key]}) is not implemented by h3jax")
      if key not in allowed:
        raise MoEConfigError(f"{where}: unknown key {what}{key!r}; h3jax reads {sorted(allowed)}")

  check_keys(raw, _TOP_KEYS, "")
  if not raw.get("base_model"):
    raise MoEConfigError(f"{where}: 'base_model' is required")
  arch = raw.get("architecture")
  if arch is not None and not "mixtral".startswith(str(arch).lower()):
    raise MoEConfigError(f"{where}: architecture {arch!r} is not implemented; h3jax writes Mixtral")
  mode = raw.get("gate_mode", "hidden")
  if mode not in GATE_MODES:
    raise MoEConfigError(f"{where}: unknown gate_mode {mode!r}; expected one of {GATE_MODES}")
  dtype = raw.get("dtype")
  if dtype is not None and dtype not in _DTYPES:
    raise MoEConfigError(f"{where}: dtype must be one of {_DTYPES}, got {dtype!r}")
  experts = raw.get("experts") or []
  if not isinstance(experts, list) or len(experts) < 2:
    raise MoEConfigError(f"{where}: 'experts' must list at least two experts")
  out = []
  for i, e in enumerate(experts):
    if not isinstance(e, Mapping) or "source_model" not in e:
      raise MoEConfigError(f"{where}: experts[{i}] must be a mapping with 'source_model'")
    check_keys(e, _EXPERT_KEYS, f"experts[{i}].")
    pos, neg = e.get("positive_prompts") or [], e.get("negative_prompts") or []
    if mode not in ("random", "uniform_random") and not pos:
      raise MoEConfigError(f"{where}: experts[{i}] has no positive_prompts (gate_mode {mode} needs them)")
    for p in list(pos) + list(neg):
      if not isinstance(p, str):
        raise MoEConfigError(f"{where}: experts[{i}] prompts must be strings, got {p!r}")
    out.append({"source_model": _ref(e["source_model"], where), "positive_prompts": list(pos),
                "negative_prompts": list(neg), "residual_scale": e.get("residual_scale")})
  k = raw.get("experts_per_token", 2)
  if not isinstance(k, int) or not 1 <= k <= len(out):
    raise MoEConfigError(f"{where}: experts_per_token must be in [1, {len(out)}], got {k!r}")
  return {"base_model": _ref(raw["base_model"], where), "experts": out, "gate_mode": mode, "dtype": dtype,
          "experts_per_token": k}


def _ref(ref: Any, where) -> str:
  if isinstance(ref, Mapping):  # mergekit's {model: {path: ..}, lora: {path: ..}} form
    from h3jax.hf import refs
    return refs.model_path(ref, where, MoEConfigError)
  if not isinstance(ref, str) or not ref:
    raise MoEConfigError(f"{where}: a model must be a path string, got {ref!r}")
  return ref


# ---------------------------------------------------------------------------
# torch's CPU generator without torch: mt19937 (numpy's legacy RandomState uses the
# same init_genrand for an int seed) and ATen's float uniform / normal_fill.


def _torch_uniform(seed: int, n: int) -> np.ndarray:
  raw = np.frombuffer(np.random.RandomState(seed).bytes(4 * n), np.uint32)
  return (raw & ((1 << 24) - 1)).astype(np.float32) * np.float32(2.0 ** -24)  # 24 random bits per float


def torch_rand(seed: int, shape) -> np.ndarray:
  """torch.manual_seed(seed); torch.rand(shape) (float32, CPU)."""
  return _torch_uniform(seed, int(np.prod(shape))).reshape(shape)


def torch_randn(seed: int, shape) -> np.ndarray:
  """torch.manual_seed(seed); torch.randn(shape) (float32, CPU): Box-Muller over blocks of 16
  uniforms (ATen normal_fill), the last block redrawn when numel is not a multiple of 16."""
  n = int(np.prod(shape))
  if n < 16:
    raise ValueError("torch_randn reproduces tensors of at least 16 elements only")
  u = _torch_uniform(seed, n + (16 if n % 16 else 0))

  def fill16(d):
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - d[:8]))
    theta = np.float32(2.0 * np.pi) * d[8:16]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)]).astype(np.float32)

  data = u[:n].copy()
  for i in range(0, n - 15, 16):
    data[i:i + 16] = fill16(data[i:i + 16])
  if n % 16:
    data[n - 16:] = fill16(u[n:n + 16])
  return data.reshape(shape)


# ---------------------------------------------------------------------------
# Router rows.


def tokenize_prompts(tokenizer, prompts: Sequence[str]):
  """mergekit-moe's tokenization: (ids_BT, mask_BT) numpy, left-padded with the BOS id."""
  pad = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
  rows = [tokenizer((tokenizer.bos_token or "") + p, add_special_tokens=False)["input_ids"] for p in prompts]
  T = max(len(r) for r in rows)
  ids = np.full((len(rows), T), pad if pad is not None else 0, np.int32)
  mask = np.zeros((len(rows), T), bool)
  for b, r in enumerate(rows):
    ids[b, T - len(r):], mask[b, T - len(r):] = r, True
  return ids, mask


def layer_inputs(params, input_ids_BT, attention_mask_BT, cfg: ModelConfig):
  """Residual stream entering every layer ([L, B, T, D] f32; HF's hidden_states[:-1]), with
  positions 0..T-1 and padded keys masked, as transformers runs a left-padded batch."""
  _, aux = llama.hidden_states(params, input_ids_BT, cfg, attention_mask_BT=attention_mask_BT,
                               collect=("layer_in",))
  return aux["layer_in"].astype(jnp.float32)


def gate_vectors(mode: str, base_cfg: ModelConfig, base_params: dict, experts: Sequence[dict],
                 tokenizer=None, seed: int = 0) -> np.ndarray:
  """mergekit-moe's gate_vecs [L, E, D] (float32) for the parsed experts."""
  L, E, D = base_cfg.num_layers, len(experts), base_cfg.hidden_size
  if mode == "random":
    return torch_randn(seed, (L, E, D))
  if mode == "uniform_random":
    s = np.float32(np.sqrt(1.0 / D))
    return torch_rand(seed, (L, E, D)) * 2 * s - s
  if mode == "cheap_embed":
    emb = np.asarray(jax.device_get(base_params["embed"]["embedding"]), np.float32)

    def vec(prompts):
      ids, mask = tokenize_prompts(tokenizer, prompts)
      v = (emb[ids] * mask[..., None]).sum(axis=(0, 1))
      return np.broadcast_to(v / max(np.linalg.norm(v), 1e-8), (L, D))
  else:
    fn = jax.jit(layer_inputs, static_argnames="cfg")

    def vec(prompts):
      ids, mask = tokenize_prompts(tokenizer, prompts)
      x_LBTD = np.asarray(fn(base_params, jnp.asarray(ids), jnp.asarray(mask), base_cfg))
      x_LBD = x_LBTD.mean(axis=2) if mode == "hidden_avg" else x_LBTD[:, :, -1]
      return x_LBD.mean(axis=1)
  rows = []
  for e in experts:
    v = vec(e["positive_prompts"]).copy()
    if e["negative_prompts"]:
      v = v - vec(e["negative_prompts"])
    rows.append(v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8))
  return np.stack(rows, axis=1).astype(np.float32)  # [L, E, D]


# ---------------------------------------------------------------------------
# Build.


def build_from_config(config, *, seed: int = 0, dtype: Optional[str] = None, load_dtype: str = "float32",
                      tokenizer=None):
  """(moe_cfg, params, out_dtype, base_dir) from a mergekit-moe YAML (path or dict)."""
  from h3jax.fusion import build as fusion
  from h3jax.hf import adapters, loader
  from h3jax.hf.load import read_hf_config
  c = read_config(config)  # idempotent on an already-read config
  base_dir, base_adapter = adapters.split_ref(c["base_model"])
  base_cfg, base_params = loader.load_model(c["base_model"], load_dtype)
  loaded = [loader.load_model(e["source_model"], load_dtype, base=base_dir) for e in c["experts"]]
  ecfgs, eparams = [], []
  for e, (ec, ep) in zip(c["experts"], loaded):
    ep = fusion.merge_lora(ep, ec.lora_scale)
    if e["residual_scale"] is not None:  # mergekit scales the expert's down_proj
      mlp = dict(ep["layers"]["mlp"])
      mlp["down_proj"] = {"kernel": mlp["down_proj"]["kernel"] * e["residual_scale"]}
      ep = dict(ep, layers=dict(ep["layers"], mlp=mlp))
    ecfgs.append(ec.replace(lora_scale=1.0))
    eparams.append(ep)
  if c["gate_mode"] not in ("random", "uniform_random") and tokenizer is None:
    tokenizer = loader.load_tokenizer(base_dir)
  base_merged = fusion.merge_lora(base_params, base_cfg.lora_scale)
  gates_LED = gate_vectors(c["gate_mode"], base_cfg, base_merged, c["experts"], tokenizer, seed)
  cfg, params = fusion.fuse_params(base_cfg, base_params, ecfgs, eparams, router_init="zeros",
                                   top_k=c["experts_per_token"])
  rdt = params["layers"]["moe"]["router"]["kernel"].dtype
  params["layers"]["moe"]["router"]["kernel"] = jnp.asarray(np.transpose(gates_LED, (0, 2, 1)), rdt)
  hf = read_hf_config(base_dir)
  out_dtype = dtype or c["dtype"] or hf.get("dtype") or hf.get("torch_dtype") or "float32"
  out_dtype = out_dtype if out_dtype in _DTYPES else "float32"
  return cfg, params, out_dtype, base_dir


def build_moe_folder(config_path, out_dir, *, seed: int = 0, overwrite: bool = False, dtype: Optional[str] = None):
  """mergekit-moe YAML -> Mixtral HF folder (tokenizer copied from the base); returns the path."""
  from h3jax.hf.export import save_pretrained
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
  c = read_config(config_path)  # every config error before any model is read
  cfg, params, out_dtype, base_dir = build_from_config(c, seed=seed, dtype=dtype)
  has_tok = any((pathlib.Path(base_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
  return save_pretrained(params, cfg, out, tokenizer_source=base_dir if has_tok else None, overwrite=overwrite,
                         dtype=out_dtype)
