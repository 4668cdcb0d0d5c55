"""chat_template in a merge config is written to the output tokenizer (mergekit semantics), never dropped."""

import json
import pathlib
import shutil

import pytest
import transformers

import merge_fixtures as mf
from conftest import SMOLLM2_DIR
from h3jax.merging.streaming import config as mcfg
from h3jax.merging.streaming import driver

T_A = "{% for m in messages %}A:{{ m['content'] }}\n{% endfor %}"
T_B = "{% for m in messages %}B:{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
  if not (SMOLLM2_DIR / "tokenizer.json").is_file():
    pytest.skip(f"SmolLM2 tokenizer not found at {SMOLLM2_DIR}")
  root = tmp_path_factory.mktemp("chat")
  base, models, _ = mf.llama_family(root, n_models=2)
  for d, t in zip([base] + models, [T_A, T_B, T_B]):
    for f in ("tokenizer.json", "tokenizer_config.json"):
      shutil.copy(SMOLLM2_DIR / f, f"{d}/{f}")
    (pathlib.Path(d) / "chat_template.jinja").write_text(t)
  return base, models


@pytest.mark.parametrize("template, want", [(T_A, T_A), ("auto", T_B.strip())])
def test_chat_template_reaches_the_output_tokenizer(family, tmp_path, template, want):
  base, models = family
  spec = mcfg.from_mergekit_dict(dict(merge_method="task_arithmetic", base_model=base, chat_template=template,
                                      models=[dict(model=m, parameters=dict(weight=0.5)) for m in models]))
  driver.run_merge(spec, tmp_path / "out", progress=False)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert tok.chat_template == want
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
      want.replace("{% for m in messages %}", "").split(":")[0] + ":hi\n"
  assert "chat_template" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())


def test_bad_chat_template_is_one_error(family):
  base, models = family
  for value, msg in [("chatml", "bundled templates"), ("{{x}}", "invalid chat_template"), (3, "must be a string")]:
    with pytest.raises(mcfg.MergeConfigError, match=msg):
      mcfg.from_mergekit_dict(dict(merge_method="linear", chat_template=value,
                                   models=[dict(model=m, parameters=dict(weight=1.0)) for m in models]))
