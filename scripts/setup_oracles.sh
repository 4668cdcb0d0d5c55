#!/usr/bin/env bash
# Creates the oracle virtualenvs used by the merging oracle tests (idempotent):
#   .venv-mergekit     mergekit==0.1.5     + torch==2.13.0 (CPU)
#   .venv-fusionbench  fusion-bench==0.2.33 + torch==2.13.0 (CPU)
# torch is pinned on the same pip command line so pip never swaps in another
# (e.g. CUDA) torch build. Re-running is a no-op once both venvs import.
# Usage: scripts/setup_oracles.sh [REPO_ROOT]
set -euo pipefail
ROOT="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
PYTHON="${PYTHON:-python3}"

make_venv() {  # make_venv DIR IMPORT VERSION PIP_ARGS...
  local dir="$ROOT/$1" mod="$2" want="$3"; shift 3
  if [ -f "$dir/.oracle-ok" ] && "$dir/bin/python" - "$mod" "$want" <<'PY' 2>/dev/null; then
import importlib.metadata as md, sys
mod, want = sys.argv[1], sys.argv[2]
assert md.version(mod) == want, md.version(mod)
assert md.version("torch").split("+")[0] == "2.13.0"
PY
    echo "[setup_oracles] $1 ok ($mod==$want)"
    return 0
  fi
  echo "[setup_oracles] creating $1 ($mod==$want)"
  # A venv hard-codes its own path, so build it in place; a failed build leaves
  # no marker and is wiped and rebuilt on the next run.
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q "$@"
  "$dir/bin/python" -c "import torch, $(echo "$mod" | tr - _); print('torch', torch.__version__)"
  touch "$dir/.oracle-ok"
  echo "[setup_oracles] $1 ready"
}

make_venv .venv-mergekit mergekit 0.1.5 "mergekit==0.1.5" "torch==2.13.0"
make_venv .venv-fusionbench fusion-bench 0.2.33 "fusion-bench==0.2.33" "torch==2.13.0"
