"""third_party/datasets.json matches the data files, regenerates byte-identically,
and its check names a changed file."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from h3jax.data import manifest
from h3jax.data import sources

MANIFEST = REPO / "third_party" / "datasets.json"


@pytest.fixture(scope="module")
def fresh(data_root):
  return manifest.build_manifest(data_root)


def test_committed_manifest_matches_files(data_root, fresh):
  assert MANIFEST.read_text(encoding="utf-8") == manifest.dumps(fresh)  # same bytes as a regeneration
  m = json.loads(MANIFEST.read_text(encoding="utf-8"))
  for name, s in m["sources"].items():  # every loader file is listed with the hash of its bytes
    path = data_root / s["folder"] / s["file"]
    assert m["folders"][s["folder"]]["files"][s["file"]]["sha256"] == manifest.sha256_file(path), name
  assert m["sources"]["alpaca_eval_preferences"]["rows"] == 25754
  assert m["sources"]["truthfulqa_generation"]["hub"] == ["truthfulqa/truthful_qa/generation/validation"]
  assert "cd543a149df89434d8a54582c0151c0b945c3d20" in m["folders"]["alpaca_eval"]["provenance_source"]
  assert set(m["sources"]) == set(sources.SOURCES)


def test_check_names_changed_file(data_root, tmp_path, fresh):
  root = tmp_path / "root"
  root.mkdir()
  for folder in fresh["folders"]:
    if folder != "advbench":
      (root / folder).symlink_to(data_root / folder)
  shutil.copytree(data_root / "advbench", root / "advbench")
  f = root / "advbench" / "harmful_behaviors.jsonl"
  f.chmod(0o644)
  f.write_text(f.read_text(encoding="utf-8").replace("bomb", "bomb!", 1), encoding="utf-8")
  out = tmp_path / "m.json"
  out.write_text(manifest.dumps(fresh), encoding="utf-8")
  with pytest.raises(ValueError, match=r"advbench/harmful_behaviors.jsonl: sha256 .* != manifest"):
    manifest.check_manifest(root, out)
  with pytest.raises(FileNotFoundError, match="manifest not found: .*create it with: python -m h3jax.data"):
    manifest.check_manifest(root, tmp_path / "none.json")


def test_cli_check(data_root):
  r = subprocess.run([sys.executable, "-m", "h3jax.data.manifest", f"--data_root={data_root}",
                      f"--check={MANIFEST}"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode == 0 and "matches the data root" in r.stdout, r.stderr[-2000:]
