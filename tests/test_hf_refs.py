"""Model references (h3jax.hf.refs): one parser for merge configs and mergekit-moe configs."""

import pytest

from h3jax.fusion import moe_config
from h3jax.hf import refs
from h3jax.merging.streaming.config import MergeConfigError, _model_path


def test_forms_resolve_to_one_path_string(tmp_path):
  assert refs.model_path("a/b", "w") == "a/b"
  assert refs.model_path({"path": "a/b"}, "w") == "a/b"
  assert refs.model_path({"model": {"path": "a"}, "lora": {"path": "x"}}, "w") == "a+x"
  assert refs.model_path({"model": "a", "lora": None}, "w") == "a"
  plus = tmp_path / "dir+with+plus"
  plus.mkdir()
  assert refs.model_path(str(plus), "w") == str(plus)  # an existing path keeps its '+'


@pytest.mark.parametrize("ref, msg", [
    ({"model": "a", "revision": "main"}, "takes 'model' and 'lora'"),
    ({"path": "a", "x": 1}, "takes only 'path'"),
    ({"path": 3}, "a model must be a path string"),
    ("a+b+c", "cannot parse model reference"),
    ("base+/no/such/adapter", "not a PEFT adapter folder"),
])
def test_bad_references_raise_the_callers_error_class(ref, msg):
  with pytest.raises(MergeConfigError, match=f"where: .*{msg}"):
    _model_path(ref, "where")
  with pytest.raises(moe_config.MoEConfigError, match=msg):
    refs.model_path(ref, "where", moe_config.MoEConfigError)


def test_moe_config_reads_mapping_references():
  experts = [{"source_model": {"model": {"path": f"e{i}"}, "lora": {"path": f"l{i}"}}} for i in range(2)]
  c = moe_config.read_config({"base_model": {"path": "base"}, "gate_mode": "random", "experts": experts})
  assert c["base_model"] == "base" and [e["source_model"] for e in c["experts"]] == ["e0+l0", "e1+l1"]
  with pytest.raises(moe_config.MoEConfigError, match="takes only 'path'"):
    moe_config.read_config({"base_model": {"path": "base", "rev": 1}, "gate_mode": "random", "experts": experts})
