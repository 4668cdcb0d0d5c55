"""`python -m h3jax.evaluate`: bad input messages, and a --limit run of the real SmolLM2-135M-Instruct."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from absl import flags

from conftest import REPO, SMOLLM2_DIR

FLAGS = flags.FLAGS


def _run_main(argv):
  from h3jax.cli import evaluate
  if "model" not in FLAGS:  # the CLI defines its flags only when run as a program
    evaluate.define_flags()
  FLAGS.unparse_flags()
  FLAGS(["evaluate", "--compilation_cache="] + argv)  # no persistent cache: it would stay on in this worker
  FLAGS.config.judges.kind = "none"  # no judge needed to reach these errors
  return evaluate.main(["evaluate"])


def test_model_folder_without_tokenizer(tmp_path, data_root):
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  (model / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match=r"model folder .*model has no tokenizer"):
    _run_main([f"--config={REPO}/configs/eval_quick.py", f"--data_root={data_root}", f"--model={model}",
               f"--out={tmp_path / 'out'}"])
  assert not (tmp_path / "out" / "results.json").exists()


def test_no_model_flag(tmp_path):
  with pytest.raises(ValueError, match=r"no models to evaluate: pass --model=DIR"):
    _run_main([f"--config={REPO}/configs/eval_quick.py", f"--out={tmp_path / 'out'}"])


def test_missing_data_root_names_the_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="data root .*absent.* is not a directory; expected layout"):
    _run_main([f"--config={REPO}/configs/eval_quick.py", f"--data_root={tmp_path / 'absent'}",
               f"--model={tmp_path}", f"--out={tmp_path / 'out'}"])


def _judges_available() -> bool:
  """Built judge artifacts (python -m h3jax.evaluation.judges.train); building them here is too slow."""
  d = pathlib.Path(os.environ.get("H3JAX_JUDGES_DIR") or REPO / "artifacts" / "judges")
  return all((d / f"{t}.npz").is_file() for t in ("refusal", "truth", "info", "pairwise"))


@pytest.mark.slow
def test_smollm2_limit_run(tmp_path, data_root):
  if not (SMOLLM2_DIR / "config.json").exists():
    pytest.fail(f"{SMOLLM2_DIR} missing: run `python -m h3jax.prepare smollm2 --out {SMOLLM2_DIR}`")
  out = tmp_path / "eval"
  cmd = [sys.executable, "-m", "h3jax.evaluate", f"--config={REPO}/configs/eval_quick.py",
         f"--model=smollm2={SMOLLM2_DIR}", "--limit=1", "--config.generation.max_new_tokens=16",
         f"--data_root={data_root}", f"--out={out}", f"--compilation_cache={tmp_path / 'xla'}"]
  if _judges_available():
    cmd.append("--config.judges.build_if_missing=False")
  else:
    cmd.append("--config.judges.kind=none")
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  elapsed = time.time() - t0
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((out / "results.json").read_text())
  assert res["settings"]["sets"] == {s: 1 for s in res["settings"]["sets"]} and len(res["settings"]["sets"]) == 8
  ms = res["models"]["smollm2"]["metrics"]
  assert ms["honest/mc1"]["n"] == 1 and 0.0 <= ms["honest/mc2"]["value"] <= 1.0
  if _judges_available():
    assert ms["harmless/xstest_safe/over_refusal_rate"]["n"] == 1
    assert ms["helpful/lc_win_rate_text_davinci_003"]["n"] == 1
  samples = [json.loads(l) for l in (out / "samples_smollm2.jsonl").read_text().splitlines()]
  gen = [s for s in samples if "response" in s]
  assert len(gen) == 7 and all(isinstance(s["response"], str) for s in gen)
  assert sum(bool(s["response"].strip()) for s in gen) >= 5  # an instruct model answers
  assert "honest/mc2" in proc.stdout and "smollm2" in proc.stdout
  assert (out / "axis_bars.png").exists() and (out / "results.md").exists()
  # A re-run that only re-scores from the cache: test_evaluation_runner.test_results_resume_and_rerun (tiny).
  print(f"smollm2 --limit 1 evaluation: {elapsed:.0f}s")


def test_quickstart_evaluates_with_the_template_it_trains_with():
  """`make quickstart` trained its experts with the chat template and evaluated them with Alpaca."""
  import importlib.util
  import re
  import shlex

  def load(path):  # a configs/*.py file's get_config()
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()

  proc = subprocess.run(["make", "-n", "quickstart"], capture_output=True, text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.replace("\\\n", " ").splitlines()  # join continued recipe lines
  line = next(l for l in lines if "-m h3jax.evaluate" in l)
  args = shlex.split(line)
  eval_cfg = args[args.index("-m") + 2:]
  cfg_file = next(a.split("=", 1)[1] for a in eval_cfg if a.startswith("--config="))
  overrides = dict(a[len("--config."):].split("=", 1) for a in eval_cfg if a.startswith("--config."))
  evaluated = overrides.get("prompt_template", load(cfg_file).prompt_template)
  train_line = next(l for l in lines if "-m h3jax.pipeline" in l)
  train_cfg = re.search(r"--config=(\S+)", train_line).group(1)
  assert evaluated == load(train_cfg).data.template == "chat"
