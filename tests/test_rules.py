"""The one path-rule dialect (h3jax.rules): globs, re:, sub:, and regexes written as globs."""

import jax
import pytest

from h3jax import rules


def test_path_str_of_key_paths_and_flat_tuples():
  tree = {"layers": {"attn": [{"kernel": 1}]}}
  (path, _), = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert rules.path_str(path) == "layers/attn/0/kernel"
  assert rules.path_str(("layers", "mlp", "up_proj", "kernel")) == "layers/mlp/up_proj/kernel"


@pytest.mark.parametrize("pattern, path, want", [
    ("layers/mlp/*", "layers/mlp/up_proj/kernel", True),  # * crosses "/"
    ("layers/mlp/*", "xlayers/mlp/up_proj", False),  # a glob matches the whole path
    ("layers/attn/[qkv]_proj/kernel", "layers/attn/k_proj/kernel", True),
    ("layers/attn/[qkv]_proj/kernel", "layers/attn/o_proj/kernel", False),
    ("re:/lora_[ab]$", "layers/mlp/up_proj/lora_b", True),  # re.search: anywhere
    ("re:^mlp", "layers/mlp", False),
    ("sub:embed_tokens", "model.embed_tokens.weight", True),
    ("sub:lm_head", "model.embed_tokens.weight", False),
])
def test_matches_hand_cases(pattern, path, want):
  assert rules.matches(pattern, path) is want


def test_first_match_wins_and_default():
  table = (("layers/moe/router/*", "router"), ("re:/lora_[ab]$", "lora"), ("*", "rest"))
  assert rules.first_match("layers/moe/router/kernel", table) == "router"
  assert rules.first_match("layers/mlp/up_proj/lora_a", table) == "lora"
  assert rules.first_match("final_norm/scale", table) == "rest"
  assert rules.first_match("x", table[:2], default=0) == 0


def test_regex_written_as_glob_is_an_error_not_a_silent_miss():
  with pytest.raises(ValueError, match=r"'\^layers/mlp/' is a glob but uses regex syntax .*write 're:\^layers/mlp/'"):
    rules.matches("^layers/mlp/", "layers/mlp/up_proj/kernel")
  with pytest.raises(ValueError, match=r"trainable\[1\]: rule pattern 'a\|b'"):
    rules.check_rules([("x/*", 1), ("a|b", 2)], "trainable")
  with pytest.raises(ValueError, match="bad regular expression"):
    rules.check_pattern("re:(unclosed")
  with pytest.raises(ValueError, match="non-empty string"):
    rules.check_pattern("")
